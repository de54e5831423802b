"""What real clients send beyond plain generation: tiling, fractional whole numbers, scripts, face
restoration and save_images, answered as A1111 1.10 answers them (or refused where voidprompt cannot)."""

from __future__ import annotations

import base64
import datetime
import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.imagemeta import read_infotext
from voidprompt.server import generation
from voidprompt.server.generation import Options, ScriptNotFoundError, build_request
from voidprompt.server.limits import Limits
from voidprompt.server.models import Img2ImgRequest, Txt2ImgRequest

# webuiapi 0.9.17's txt2img body (its defaults) with the Photoshop plugin's tiling switch on.
WEBUIAPI = {
    "prompt": "stone wall",
    "negative_prompt": "",
    "seed": 5,
    "steps": 2,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "tiling": True,
    "restore_faces": False,
    "script_name": None,
    "script_args": [],
    "alwayson_scripts": {},
    "send_images": True,
    "save_images": False,
}


def _request(**body: Any) -> Any:
    return build_request(Txt2ImgRequest(**body), Options(), Limits()).request


def test_tiling_is_a_request_field_with_a1111s_precedence() -> None:
    assert _request(**WEBUIAPI).tiling is True
    assert _request(**{**WEBUIAPI, "tiling": None}).tiling is False  # A1111's setting, off
    assert _request(prompt="x").tiling is False
    infotext = "x\nSteps: 3, Sampler: Euler, Seed: 1, Size: 64x64, Tiling: True"
    assert _request(infotext=infotext).tiling is True
    # A field the client set wins over the infotext.
    assert _request(infotext=infotext, tiling=False).tiling is False
    # A1111's "tiling" setting is what None means; override_settings sets it for one request.
    tiled_server = Options({"tiling": True})
    assert build_request(Txt2ImgRequest(prompt="x"), tiled_server, Limits()).request.tiling is True
    assert (
        build_request(Txt2ImgRequest(prompt="x", tiling=None), tiled_server, Limits()).request.tiling is True
    )
    assert build_request(Txt2ImgRequest(tiling=False), tiled_server, Limits()).request.tiling is False
    assert _request(prompt="x", override_settings={"tiling": True}).tiling is True


def test_fractional_whole_numbers_truncate_as_a1111s_pydantic_v1_does() -> None:
    # aiyabot sends hires steps as floats; A1111's models run int() on them.
    body = {"prompt": "x", "enable_hr": True, "hr_second_pass_steps": 12.5, "steps": 20.0}
    request = _request(**body)
    assert (request.hr_second_pass_steps, request.steps) == (12, 20)
    assert _request(**{**body, "hr_second_pass_steps": 20.0}).hr_second_pass_steps == 20
    # int() truncates toward zero: -1.5 is -1, A1111's "random seed".
    assert Txt2ImgRequest(seed=-1.5).seed == -1
    assert Img2ImgRequest(mask_blur=4.9, inpainting_fill=1.2).mask_blur == 4
    # Numbers that are not whole-number fields keep their fraction.
    assert Txt2ImgRequest(cfg_scale=7.5, hr_scale=1.5).cfg_scale == 7.5


def test_restore_faces_names_the_missing_restorers() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        _request(**{**WEBUIAPI, "restore_faces": True})
    message = str(caught.value)
    assert message.startswith("restore_faces=true: no face restorer is installed")
    assert "GFPGAN" in message and "CodeFormer" in message and "restore_faces=false" in message
    # None and false are "no face restoration".
    assert _request(**{**WEBUIAPI, "restore_faces": None}).prompt == "stone wall"


def test_scripts_are_looked_up_without_case(monkeypatch: pytest.MonkeyPatch) -> None:
    for extra, name in (
        ({"script_name": "X/Y/Z Plot"}, "X/Y/Z Plot"),
        ({"alwayson_scripts": {"controlnet": {"args": []}}}, "controlnet"),
        ({"alwayson_scripts": {"ADetailer": {"args": [True]}}}, "ADetailer"),
    ):
        with pytest.raises(ScriptNotFoundError) as caught:
            _request(**{**WEBUIAPI, **extra})
        assert str(caught.value) == f"Script '{name}' not found"
    # An empty script_name is no script at all (webuiapi sends None, some clients "").
    assert _request(**{**WEBUIAPI, "script_name": ""}).tiling is True
    # A script voidprompt runs is found in any case, as A1111's title().lower() lookup finds it.
    monkeypatch.setattr(generation, "SELECTABLE_SCRIPTS", frozenset({"x/y/z plot"}))
    assert generation.known_script("X/Y/Z PLOT") and not generation.known_script("x/y/z plot", alwayson=True)
    assert generation.known_script("Seed", alwayson=True) and not generation.known_script("Seed")
    _request(**{**WEBUIAPI, "script_name": "X/Y/Z plot", "alwayson_scripts": {"SEED": {}}})


def test_a1111s_own_always_on_scripts_are_found_and_their_args_ignored() -> None:
    # A1111 1.10 has Seed, Sampler and Refiner (built-in UI scripts: setup_for_ui_only, so over the
    # API their args never reach the processing object), Comments, Hypertile and Extra options.
    plain = _request(**WEBUIAPI)
    scripts = {
        "Seed": {"args": [99, False, -1, 0, 0, 0]},
        "Sampler": {"args": [50, "DDIM", "Karras"]},
        "Refiner": {"args": [True, "some-refiner.safetensors", 0.5]},
        "comments": {},
        "Hypertile": {"args": []},
        "Extra options": {"args": []},
    }
    with_scripts = _request(**{**WEBUIAPI, "alwayson_scripts": scripts})
    assert with_scripts == plain
    assert (with_scripts.seed, with_scripts.steps, with_scripts.refiner_checkpoint) == (
        plain.seed, plain.steps, plain.refiner_checkpoint,
    )  # fmt: skip
    # Soft Inpainting is img2img's only; switched on it would change the picture, so it is refused.
    with pytest.raises(ScriptNotFoundError, match="Script 'Soft Inpainting' not found"):
        _request(**{**WEBUIAPI, "alwayson_scripts": {"Soft Inpainting": {"args": [False]}}})
    png = io.BytesIO()
    Image.new("RGB", (8, 8), "gray").save(png, format="PNG")
    picture = base64.b64encode(png.getvalue()).decode()
    img2img = {**WEBUIAPI, "init_images": [picture]}
    body = {**img2img, "alwayson_scripts": {"soft inpainting": {"args": [False, 1, 0.5]}}}
    assert build_request(Img2ImgRequest(**body), Options(), Limits(), img2img=True).request.prompt
    with pytest.raises(InvalidRequestError, match="no soft inpainting"):
        body = {**img2img, "alwayson_scripts": {"Soft Inpainting": {"args": [True, 1, 0.5]}}}
        build_request(Img2ImgRequest(**body), Options(), Limits(), img2img=True)
    # A selectable script is not an always-on one (A1111's own 422 detail).
    with pytest.raises(ScriptNotFoundError, match="Cannot have a selectable script"):
        _request(**{**WEBUIAPI, "alwayson_scripts": {"X/Y/Z plot": {"args": []}}})


def test_save_images_goes_to_a1111s_dated_outputs_folder(tmp_path: Path) -> None:
    from voidprompt.server.cli import _parser, build_config
    from voidprompt.server.routes import sdapi_generation
    from voidprompt.server.state import ServerConfig

    # Without --outdir: A1111's folder, relative to where the server runs.
    assert build_config(_parser().parse_args(["--no-miniature"])).outdir == Path("outputs")  # type: ignore[union-attr]
    assert ServerConfig().outdir == Path("outputs")
    chosen = build_config(_parser().parse_args(["--no-miniature", "--outdir", str(tmp_path)]))
    assert chosen.outdir == tmp_path  # type: ignore[union-attr]

    before = datetime.date.today().isoformat()
    state = SimpleNamespace(config=SimpleNamespace(outdir=tmp_path))
    result = SimpleNamespace(
        images=[Image.new("RGB", (8, 8), "red")], infotexts=["a\nSeed: 7"], seeds=[7], explanations=[]
    )
    sdapi_generation._save_images(state, "img2img", SimpleNamespace(result=result))  # type: ignore[arg-type]
    after = datetime.date.today().isoformat()
    saved = sorted(tmp_path.rglob("*.png"))
    assert len(saved) == 1
    # <outdir>/img2img-images/<YYYY-MM-DD>/<5-digit count>-<seed>.png, A1111's default names.
    assert saved[0].parent.parent == tmp_path / "img2img-images"
    assert saved[0].parent.name in (before, after)
    assert saved[0].name == "00000-7.png"
    with Image.open(saved[0]) as image:
        assert read_infotext(image)[0] == "a\nSeed: 7"


def test_webuiapi_tiling_request_generates_a_tiled_picture(server: Any) -> None:
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as http:
        tiled = http.post("/sdapi/v1/txt2img", json=WEBUIAPI)
        plain = http.post("/sdapi/v1/txt2img", json={**WEBUIAPI, "tiling": False})
    assert tiled.status_code == 200 and plain.status_code == 200, tiled.text
    tiled_info, plain_info = json.loads(tiled.json()["info"]), json.loads(plain.json()["info"])
    assert ", Tiling: True" in tiled_info["infotexts"][0]
    assert "Tiling" not in plain_info["infotexts"][0]
    assert tiled.json()["images"][0] != plain.json()["images"][0]

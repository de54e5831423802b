"""SDXL over the A1111 API: listed and switched next to SD1, its five options, its embeddings, and
one model in memory at a time."""

from __future__ import annotations

import base64
import gc
import io
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.infotext import parse_generation_parameters
from voidprompt.models.detect import ModelFamily
from voidprompt.server.checkpoints import ModelRegistry, read_checkpoint_facts
from voidprompt.server.generation import ModelHost, Options, build_request
from voidprompt.server.limits import Limits
from voidprompt.server.models import Txt2ImgRequest
from voidprompt.server.queue import State
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

# The tiny files' text encoders: SD1's CLIP is 32 wide; SDXL's CLIP-L and bigG are 32 wide each.
SD1_WIDTH = 32
SDXL_L_WIDTH = SDXL_G_WIDTH = 32
SDXL_OPTIONS = {
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_clip_l_skip": False,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
}


def _txt2img(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a red circle", "seed": 5, "steps": 2, "width": 64, "height": 64, **fields}
    r = http.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    data["info"] = json.loads(data["info"])
    return data


def _pixels(data: dict[str, Any]) -> bytes:
    return Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).convert("RGB").tobytes()


def test_sdxl_listed_and_switched_next_to_sd1(xl_server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=xl_server.url, timeout=120) as http:
        models = {m["model_name"]: m for m in http.get("/sdapi/v1/sd-models").json()}
        families = {name: m["family"] for name, m in models.items()}
        assert families == {"tiny": "sd1", "tiny-refiner": "sdxl-refiner", "tiny-xl": "sdxl"}
        # The native size from the header: the families' own (the tiny files record no other).
        sides = {name: m["native_size"] for name, m in models.items()}
        assert sides == {"tiny": 512, "tiny-refiner": 1024, "tiny-xl": 1024}
        xl = models["tiny-xl"]
        assert xl["title"] == f"tiny-xl.safetensors [{xl['hash']}]"

        # One request on SDXL by override_settings; the selection stays SD1.
        data = _txt2img(http, override_settings={"sd_model_checkpoint": "tiny-xl"})
        assert data["info"]["sd_model_name"] == "tiny-xl"
        params = parse_generation_parameters(data["info"]["infotexts"][0])
        assert params["Model"] == "tiny-xl" and params["Model hash"] == xl["hash"]
        assert Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).size == (64, 64)
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("tiny.safetensors")

        # Selected through the options, as A1111's clients switch models.
        r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": xl["title"]})
        assert r.status_code == 200, r.text
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == xl["title"]
        assert _txt2img(http)["info"]["sd_model_name"] == "tiny-xl"
        # img2img on it too, from the picture it just made.
        init = _txt2img(http)["images"][0]
        r = http.post(
            "/sdapi/v1/img2img",
            json={
                "init_images": [init],
                "prompt": "a blue circle",
                "steps": 2,
                "width": 64,
                "height": 64,
                "denoising_strength": 0.5,
            },
        )
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sd_model_name"] == "tiny-xl" and (info["width"], info["height"]) == (64, 64)
        r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"})
        assert r.status_code == 200, r.text
        assert _txt2img(http)["info"]["sd_model_name"] == "tiny"


def test_sdxl_options_over_the_api(xl_server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=xl_server.url, timeout=120) as http:
        options = http.get("/sdapi/v1/options").json()
        assert {k: options[k] for k in SDXL_OPTIONS} == SDXL_OPTIONS
        r = http.post("/sdapi/v1/options", json={"sdxl_crop_top": -8})
        assert r.status_code == 400 and "sdxl_crop_top=-8" in r.json()["detail"]
        r = http.post("/sdapi/v1/options", json={"sdxl_refiner_high_aesthetic_score": 11})
        assert r.status_code == 400 and "0..10" in r.json()["detail"]
        r = http.post("/sdapi/v1/options", json={"sdxl_clip_l_skip": "yes"})
        assert r.status_code == 400 and "must be bool" in r.json()["detail"]
        assert http.get("/sdapi/v1/options").json()["sdxl_crop_top"] == 0

        # The crop reaches SDXL's size vector: a different picture from the same seed. SD1 has no
        # size vector, so the same option changes nothing there.
        xl = {"sd_model_checkpoint": "tiny-xl"}
        plain = _pixels(_txt2img(http, override_settings=xl))
        cropped = _pixels(_txt2img(http, override_settings={**xl, "sdxl_crop_top": 32}))
        assert cropped != plain
        sd1_plain = _pixels(_txt2img(http))
        assert _pixels(_txt2img(http, override_settings={"sdxl_crop_top": 32})) == sd1_plain

        changed = {
            "sdxl_crop_top": 32,
            "sdxl_crop_left": 16,
            "sdxl_clip_l_skip": True,
            "sdxl_refiner_low_aesthetic_score": 3,
            "sdxl_refiner_high_aesthetic_score": 7.5,
        }
        overridden = _pixels(_txt2img(http, override_settings={**xl, **changed}))
        try:
            assert http.post("/sdapi/v1/options", json=changed).status_code == 200
            options = http.get("/sdapi/v1/options").json()
            assert {k: options[k] for k in SDXL_OPTIONS} == {
                **changed,
                "sdxl_refiner_low_aesthetic_score": 3.0,
            }
            # As settings they give the picture the same one-request overrides gave.
            assert _pixels(_txt2img(http, override_settings=xl)) == overridden
        finally:
            assert http.post("/sdapi/v1/options", json=SDXL_OPTIONS).status_code == 200


def test_sdxl_options_reach_the_request() -> None:
    """Settings < the request's own override_settings, for each of the five (one place: the options
    table's request fields)."""
    options = Options()
    built = build_request(Txt2ImgRequest(prompt="x"), options, Limits())
    assert {k: getattr(built.request, k) for k in SDXL_OPTIONS} == SDXL_OPTIONS
    options.update(Options.normalise({"sdxl_crop_top": 64, "sdxl_clip_l_skip": True}))
    request = build_request(Txt2ImgRequest(prompt="x"), options, Limits()).request
    assert (request.sdxl_crop_top, request.sdxl_crop_left, request.sdxl_clip_l_skip) == (64, 0, True)
    body = Txt2ImgRequest(
        prompt="x",
        override_settings={
            "sdxl_crop_left": 8,
            "sdxl_refiner_low_aesthetic_score": 1.5,
            "sdxl_clip_l_skip": False,
        },
    )
    request = build_request(body, options, Limits()).request
    assert (request.sdxl_crop_top, request.sdxl_crop_left, request.sdxl_clip_l_skip) == (64, 8, False)
    assert request.sdxl_refiner_low_aesthetic_score == 1.5
    assert request.sdxl_refiner_high_aesthetic_score == 6.0
    with pytest.raises(InvalidRequestError, match="sdxl_crop_left=-1"):
        build_request(Txt2ImgRequest(override_settings={"sdxl_crop_left": -1}), options, Limits())


def test_sdxl_embeddings(xl_server) -> None:  # type: ignore[no-untyped-def]
    """A1111 on SDXL: a clip_l + clip_g file is loaded (its shape is 32 + 32 here, 768 + 1280 on a
    real model) and an SD1 file skipped; on SD1 the other way round."""
    with httpx.Client(base_url=xl_server.url, timeout=120) as http:
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-xl"}).status_code == 200
        try:
            listed = http.get("/sdapi/v1/embeddings").json()
            assert {k: v["shape"] for k, v in listed["loaded"].items()} == {
                "xlstyle": SDXL_L_WIDTH + SDXL_G_WIDTH
            }
            assert listed["loaded"]["xlstyle"]["vectors"] == 3
            assert {k: v["shape"] for k, v in listed["skipped"].items()} == {"sdonestyle": SD1_WIDTH}

            used = _txt2img(http, prompt="a circle, xlstyle")
            params = parse_generation_parameters(used["info"]["infotexts"][0])
            assert "xlstyle:" in params["TI hashes"]
            # The embedding's vectors stand in the prompt: not the picture of the plain words.
            plain = _txt2img(http, prompt="a circle, xlstyle-not")
            assert _pixels(used) != _pixels(plain)
            r = http.post(
                "/sdapi/v1/txt2img", json={"prompt": "sdonestyle", "steps": 1, "width": 64, "height": 64}
            )
            assert r.status_code == 400 and "not an SDXL embedding" in r.json()["detail"]
        finally:
            assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}).status_code == 200
        listed = http.get("/sdapi/v1/embeddings").json()
        assert set(listed["loaded"]) == {"sdonestyle"} and set(listed["skipped"]) == {"xlstyle"}


def test_embeddings_listed_before_the_sdxl_model_loads(tmp_path: Path, tiny_sdxl: Path) -> None:
    """The header-only width: CLIP-L's + bigG's for the base, bigG's alone for the refiner."""
    refiner = write_tiny_sdxl_checkpoint(tmp_path / "refiner.safetensors", refiner=True)
    assert read_checkpoint_facts(tiny_sdxl).family is ModelFamily.SDXL
    assert read_checkpoint_facts(tiny_sdxl).text_width == SDXL_L_WIDTH + SDXL_G_WIDTH
    assert read_checkpoint_facts(refiner).family is ModelFamily.SDXL_REFINER
    assert read_checkpoint_facts(refiner).text_width == SDXL_G_WIDTH
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert read_checkpoint_facts(junk).family is None


def _host(folder: Path) -> ModelHost:
    registry = ModelRegistry([folder])
    registry.refresh()
    return ModelHost(registry, Options(), State())


def test_switching_models_frees_the_previous_one(
    tmp_path: Path, tiny_checkpoint: Path, tiny_sdxl: Path
) -> None:
    """One model in memory (A1111's default): the old one is gone before the next one loads."""
    import voidprompt.server.generation as generation

    shutil.copy(tiny_checkpoint, tmp_path / "a.safetensors")
    shutil.copy(tiny_sdxl, tmp_path / "b.safetensors")
    host = _host(tmp_path)
    alive_at_load: list[bool] = []
    previous: list[weakref.ref[Any]] = []
    real_load = generation.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive_at_load.append(any(ref() is not None for ref in previous))
        return real_load(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "load_model", load_model)
        for name in ("a.safetensors", "b.safetensors", "a.safetensors"):
            engine = host.ensure_loaded(host.registry.find(name), None)
            previous = [weakref.ref(engine), weakref.ref(engine.components.unet)]
            del engine
    assert alive_at_load == [False, False, False]
    assert host.engine is not None and host.engine.components.text_encoder_2 is None
    assert host.loaded is not None and host.loaded[0].name == "a.safetensors"


def test_refiner_switch_over_the_api(xl_server) -> None:  # type: ignore[no-untyped-def]
    """A1111's refiner_checkpoint / refiner_switch_at: the refiner, found by any of its aliases,
    takes over the pass; its settings are options; an unknown name lists the checkpoints."""
    with httpx.Client(base_url=xl_server.url, timeout=120) as http:
        models = {m["model_name"]: m for m in http.get("/sdapi/v1/sd-models").json()}
        xl = {"sd_model_checkpoint": "tiny-xl"}
        fields = {"steps": 4, "override_settings": xl}
        plain = _txt2img(http, **fields)
        refined = _txt2img(http, **fields, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)
        params = parse_generation_parameters(refined["info"]["infotexts"][0])
        assert params["Refiner switch at"] == "0.5"
        assert models["tiny-refiner"]["hash"] in str(params["Refiner"])
        assert "Refiner" not in parse_generation_parameters(plain["info"]["infotexts"][0])
        assert _pixels(refined) != _pixels(plain)
        # The same refiner by its title: the same picture.
        by_title = _txt2img(
            http, **fields, refiner_checkpoint=models["tiny-refiner"]["title"], refiner_switch_at=0.5
        )
        assert _pixels(by_title) == _pixels(refined)
        r = http.post(
            "/sdapi/v1/txt2img",
            json={"prompt": "x", "steps": 2, "width": 64, "height": 64, "override_settings": xl,
                  "refiner_checkpoint": "no-such-refiner"},
        )  # fmt: skip
        assert r.status_code == 404 and "no-such-refiner" in r.json()["detail"]
        assert "tiny-refiner.safetensors [" in r.json()["detail"]
        options = http.get("/sdapi/v1/options").json()
        assert options["hires_fix_refiner_pass"] == "second pass"
        assert options["refiner_switch_by_sample_steps"] is False
        r = http.post("/sdapi/v1/options", json={"hires_fix_refiner_pass": "third pass"})
        assert r.status_code == 400 and "both passes" in r.json()["detail"]


def test_refiner_fields_and_settings_reach_the_request() -> None:
    options = Options()
    options.update(Options.normalise({"hires_fix_refiner_pass": "both passes"}))
    body = Txt2ImgRequest(
        refiner_checkpoint="sd_xl_refiner_1.0",
        refiner_switch_at=0.8,
        override_settings={"refiner_switch_by_sample_steps": True},
    )
    request = build_request(body, options, Limits()).request
    assert (request.refiner_checkpoint, request.refiner_switch_at) == ("sd_xl_refiner_1.0", 0.8)
    assert (request.hires_fix_refiner_pass, request.refiner_switch_by_sample_steps) == ("both passes", True)
    with pytest.raises(InvalidRequestError, match="refiner_switch_at"):
        build_request(Txt2ImgRequest(refiner_checkpoint="r", refiner_switch_at=1.5), options, Limits())


def test_live_preview_uses_sdxls_own_latent_colours() -> None:
    """A1111's "Approx cheap" preview: SDXL's latents map to RGB through their own factors."""
    from voidprompt.models.latent_rgb import CHEAP_SD1, CHEAP_SDXL
    from voidprompt.server.routes.sdapi_generation import _preview

    latent = torch.zeros(1, 4, 2, 2)
    latent[0, 0] = 1.0  # channel 0 alone: the first row of factors, (x + 1) * 127.5 truncated
    for mapping, rgb in ((CHEAP_SD1, (165, 153, 154)), (CHEAP_SDXL, (171, 180, 183))):
        data = _preview(latent, mapping)
        assert data is not None
        image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        assert image.getpixel((1, 1)) == rgb

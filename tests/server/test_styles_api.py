"""A1111 prompt styles over the API: ``--styles-file``, ``/sdapi/v1/prompt-styles``, ``styles`` in a
generation request (applied as A1111 applies them) and styles read back out of an infotext."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from voidprompt.infotext import request_fields_from_params

pytest.importorskip("fastapi")

BASE: dict[str, Any] = {
    "negative_prompt": "text",
    "seed": 77,
    "steps": 2,
    "cfg_scale": 5.0,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
}

CSV = (
    "name,prompt,negative_prompt\n"
    '# header comment,"ignored, {prompt}",ignored\n'
    'framed,"a blue frame around {prompt}, sharp","lowres"\n'
    'tail,"best quality",\n'
    '#hidden,"never",never\n'
)


@pytest.fixture(scope="module")
def styles_server(tmp_path_factory, tiny_checkpoint, server_tools) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("styles-server")
    first, second = root / "styles.csv", root / "more.csv"
    first.write_text(CSV, encoding="utf-8")
    second.write_text('name,prompt,negative_prompt\nextra,"{prompt} (extra)",\n', encoding="utf-8")
    config = make_config(root, tiny_checkpoint, styles_files=[first, second])
    yield from start_server(config)


def generate(url: str, **fields: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/sdapi/v1/txt2img", json={**BASE, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def pixels(body: dict[str, Any]) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    return np.asarray(image.convert("RGB"))


def test_prompt_styles_route(styles_server: Any) -> None:
    response = httpx.get(f"{styles_server.url}/sdapi/v1/prompt-styles", timeout=30)
    assert response.status_code == 200
    # Rows whose name starts with "#" are skipped; both files are read, in order.
    assert response.json() == [
        {"name": "framed", "prompt": "a blue frame around {prompt}, sharp", "negative_prompt": "lowres"},
        {"name": "tail", "prompt": "best quality", "negative_prompt": ""},
        {"name": "extra", "prompt": "{prompt} (extra)", "negative_prompt": ""},
    ]


def test_unknown_style_none_is_ignored_but_strips(styles_server: Any) -> None:
    # aiyabot's request: "None" is no style; A1111 still merges an empty style, which strips the prompts.
    styled = generate(styles_server.url, prompt="  a red square ", negative_prompt=" text ", styles=["None"])
    plain = generate(styles_server.url, prompt="a red square", negative_prompt="text")
    assert np.array_equal(pixels(styled), pixels(plain))
    assert json.loads(styled["info"])["styles"] == ["None"]


def test_placeholder_style_equals_expanded_prompt(styles_server: Any) -> None:
    styled = generate(styles_server.url, prompt="a red square", styles=["framed", "nope", "tail"])
    expanded = "a blue frame around a red square, sharp, best quality"
    direct = generate(styles_server.url, prompt=expanded, negative_prompt="text, lowres")
    assert np.array_equal(pixels(styled), pixels(direct))
    info = json.loads(styled["info"])
    # A1111's info reports the styled prompts (Processed.js: all_prompts[0]) and the names sent.
    assert (info["prompt"], info["negative_prompt"]) == (expanded, "text, lowres")
    assert (info["all_prompts"], info["all_negative_prompts"]) == ([expanded], ["text, lowres"])
    assert info["styles"] == ["framed", "nope", "tail"]
    infotext = info["infotexts"][0]
    assert infotext.startswith(f"{expanded}\nNegative prompt: text, lowres\n")
    # The infotext's own text matches the one written for the expanded prompt sent directly.
    assert infotext == json.loads(direct["info"])["infotexts"][0]


def test_png_info_reads_styles_back(styles_server: Any) -> None:
    styled = generate(styles_server.url, prompt="a red square", styles=["framed", "tail"])
    response = httpx.post(
        f"{styles_server.url}/sdapi/v1/png-info", json={"image": styled["images"][0]}, timeout=30
    )
    assert response.status_code == 200, response.text
    params = response.json()["parameters"]
    assert params["Styles array"] == ["framed", "tail"]
    assert params["Prompt"] == "a red square"
    assert params["Negative prompt"] == "text"
    fields = request_fields_from_params(params)
    assert fields["styles"] == ("framed", "tail")
    assert fields["prompt"] == "a red square"
    # Regenerating from what was read back gives the same picture.
    again = generate(
        styles_server.url,
        prompt=fields["prompt"],
        negative_prompt=fields["negative_prompt"],
        styles=["framed", "tail"],
    )
    assert np.array_equal(pixels(again), pixels(styled))


def test_serve_styles_file_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voidprompt.server.cli import _parser, build_config
    from voidprompt.server.state import DEFAULT_STYLES_FILE, ServerConfig, load_styles

    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    config = build_config(
        _parser().parse_args(["--no-miniature", "--styles-file", str(a), "--styles-file", str(b)])
    )
    assert isinstance(config, ServerConfig)
    assert config.styles_files == [a, b]
    config = build_config(_parser().parse_args(["--no-miniature"]))
    assert isinstance(config, ServerConfig)
    assert config.styles_files == [DEFAULT_STYLES_FILE]
    # A1111's default file is optional; a file named on the command line is not.
    monkeypatch.chdir(tmp_path)
    assert len(load_styles([DEFAULT_STYLES_FILE])) == 0
    (tmp_path / "styles.csv").write_text("name,prompt,negative_prompt\ns,x,\n", encoding="utf-8")
    assert load_styles([DEFAULT_STYLES_FILE]).names == ["s"]
    with pytest.raises(Exception, match="styles file"):
        load_styles([a])

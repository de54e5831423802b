"""A1111's NaN check over the API: a model that makes NaN is A1111's 500 ``NansException`` answer
(not a black picture), and ``serve --disable-nan-check`` gives the black picture as A1111 does."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from voidprompt.server.cli import _parser, build_config

BODY = {"prompt": "a cat", "seed": 3, "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with one NaN in the UNet's first convolution."""
    state = load_file(str(tiny_checkpoint))
    with safe_open(str(tiny_checkpoint), "pt") as source:
        metadata = source.metadata()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "nan.safetensors"
    save_file(state, str(path), metadata=metadata)
    return path


def test_serve_takes_the_flag() -> None:
    assert build_config(_parser().parse_args(["--no-miniature"])).disable_nan_check is False  # type: ignore[attr-defined]
    config = build_config(_parser().parse_args(["--no-miniature", "--disable-nan-check"]))
    assert config.disable_nan_check is True  # type: ignore[attr-defined]


def test_a_nan_model_is_a1111s_nans_exception_answer(
    nan_checkpoint: Path, tmp_path: Path, server_tools: Any
) -> None:
    make_config, start_server = server_tools
    for running in start_server(make_config(tmp_path, nan_checkpoint)):
        answer = httpx.post(f"{running.url}/sdapi/v1/txt2img", json=BODY, timeout=120)
        assert answer.status_code == 500
        error = answer.json()
        assert error["error"] == "NansException" and error["body"] == ""
        assert error["errors"].startswith("A tensor with NaNs was produced in Unet.")
        assert "\n" not in error["errors"] and "--disable-nan-check" in error["errors"]
        # The server goes on: the next request is answered the same way, and nothing is in progress.
        assert httpx.post(f"{running.url}/sdapi/v1/txt2img", json=BODY, timeout=120).status_code == 500
        assert httpx.get(f"{running.url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


# NaN -> uint8 warns, in A1111 too.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_serve_with_disable_nan_check_answers_the_black_picture(
    nan_checkpoint: Path, tmp_path: Path, server_tools: Any
) -> None:
    make_config, start_server = server_tools
    for running in start_server(make_config(tmp_path, nan_checkpoint, disable_nan_check=True)):
        answer = httpx.post(f"{running.url}/sdapi/v1/txt2img", json=BODY, timeout=120)
        assert answer.status_code == 200
        images = answer.json()["images"]
        assert len(images) == 1
        picture = Image.open(io.BytesIO(base64.b64decode(images[0])))
        assert picture.size == (32, 32) and not np.asarray(picture.convert("RGB")).any()

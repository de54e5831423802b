"""One request, two front ends: the A1111 API and the Engine give bit-identical pictures and infotexts.

The server runs the Engine's own iteration loop (its skip and interrupt are Engine hooks), so every
``n_iter`` iteration, batch position, inpainting fill and the hires pass must come out the same as a
direct ``Engine.generate`` of the same request on the same checkpoint.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

SIZE = 64
COMMON: dict[str, Any] = {
    "prompt": "a red square, (blue:1.2)",
    "negative_prompt": "lowres, text",
    "seed": 1234,
    "subseed": 99,
    "steps": 3,
    "cfg_scale": 6.5,
    "width": SIZE,
    "height": SIZE,
    "sampler_name": "Euler a",
}


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def init_image() -> Image.Image:
    rng = np.random.default_rng(5)
    ramp = np.linspace(0, 255, SIZE, dtype=np.float64)
    channels = [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (SIZE, 1)), np.full((SIZE, SIZE), 90.0)]
    pixels = np.stack(channels, -1)
    pixels += rng.normal(0, 12, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def mask_image() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[16:48, 20:56] = 255
    return Image.fromarray(mask, mode="L")


def through_api(server: Any, route: str, body: dict[str, Any]) -> tuple[list[Image.Image], list[str]]:
    with httpx.Client(base_url=server.url, timeout=120) as http:
        response = http.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    return [decode(image) for image in data["images"]], json.loads(data["info"])["infotexts"]


def assert_identical(api: tuple[list[Image.Image], list[str]], engine_images: list[Image.Image],
                     engine_infotexts: list[str]) -> None:  # fmt: skip
    images, infotexts = api
    assert infotexts == engine_infotexts
    assert len(images) == len(engine_images)
    for a, b in zip(images, engine_images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b.convert("RGB")))


def iterations_and_batches() -> list[Any]:
    """(n_iter, batch_size): 2 x 2 in the quick suite, the whole 1-3 x 1-2 cross in the slow one."""
    return [
        pytest.param(n_iter, batch, marks=() if (n_iter, batch) == (2, 2) else pytest.mark.slow)
        for n_iter in (1, 2, 3)
        for batch in (1, 2)
    ]


@pytest.mark.parametrize("hires", [False, True])
@pytest.mark.parametrize(("n_iter", "batch_size"), iterations_and_batches())
def test_txt2img(server: Any, tiny_engine: Engine, n_iter: int, batch_size: int, hires: bool) -> None:
    fields = dict(COMMON, n_iter=n_iter, batch_size=batch_size)
    if hires:
        fields.update(enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.6)
    api = through_api(server, "txt2img", fields)
    result = tiny_engine.generate(GenerationRequest(**fields))
    assert len(result) == n_iter * batch_size
    assert_identical(api, result.images, result.infotexts)


@pytest.mark.parametrize("inpainting_fill", [None, 0, 1, 2, 3])
@pytest.mark.parametrize(("n_iter", "batch_size"), iterations_and_batches())
def test_img2img(
    server: Any, tiny_engine: Engine, n_iter: int, batch_size: int, inpainting_fill: int | None
) -> None:
    """``None``: plain img2img; 0-3: inpainting with A1111's four masked-content fills."""
    fields = dict(COMMON, n_iter=n_iter, batch_size=batch_size, denoising_strength=0.7)
    body = dict(fields, init_images=[png_base64(init_image())])
    request = GenerationRequest(**fields, init_images=(init_image(),))
    if inpainting_fill is not None:
        # "Only masked" (A1111's API default) for the fills that keep the picture's content around
        # the mask, "Whole picture" for the others: both inpaint areas go through both front ends.
        full_res = inpainting_fill in (1, 2)
        fields = {
            "inpainting_fill": inpainting_fill,
            "mask_blur_x": 4,
            "mask_blur_y": 4,
            "inpaint_full_res": full_res,
            "inpaint_full_res_padding": 8 if full_res else 0,
        }
        body.update(fields, mask=png_base64(mask_image()), mask_blur=4)
        request = request.replace(**fields, mask=mask_image())
    api = through_api(server, "img2img", body)
    result = tiny_engine.generate(request)
    assert len(result) == n_iter * batch_size
    assert_identical(api, result.images, result.infotexts)

"""Inpainting in the Engine: the unmasked area survives exactly, masked content modes, only masked,
9-channel inpainting checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_checkpoint(Path(tmp_path_factory.mktemp("inpaint")) / "tiny.safetensors")
    return Engine(load_model(path))


@pytest.fixture(scope="module")
def inpainting_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_checkpoint(
        Path(tmp_path_factory.mktemp("inpaint9")) / "tiny-inpainting.safetensors", inpainting=True
    )
    return Engine(load_model(path))


def image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int, lo: int, hi: int) -> np.ndarray:
    values = np.zeros((size, size), dtype=np.uint8)
    values[lo:hi, lo:hi] = 255
    return values


def request(init: Image.Image, mask: np.ndarray, **kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(
        prompt="a blue cube",
        seed=77,
        steps=3,
        width=init.width,
        height=init.height,
        init_images=(init,),
        mask=Image.fromarray(mask),
        denoising_strength=0.9,
    )
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_unmasked_region_is_the_original(engine: Engine, fill: int) -> None:
    init, mask = image(32), square_mask(32, 8, 24)
    result = engine.generate(request(init, mask, inpainting_fill=fill, mask_blur_x=0, mask_blur_y=0))
    out, original = np.asarray(result.images[0]), np.asarray(init)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert (out[mask == 255] != original[mask == 255]).any(axis=-1).mean() > 0.9


def test_blurred_mask_keeps_pixels_beyond_the_blur(engine: Engine) -> None:
    init, mask = image(48, 1), square_mask(48, 20, 28)
    result = engine.generate(request(init, mask, mask_blur_x=4, mask_blur_y=4))
    out, original = np.asarray(result.images[0]), np.asarray(init)
    # Blur 4 has a 21-tap kernel (radius 10): pixels 10+ away from the square are untouched by it.
    far = np.ones((48, 48), dtype=bool)
    far[10:38, 10:38] = False
    assert np.array_equal(out[far], original[far])
    assert (out[20:28, 20:28] != original[20:28, 20:28]).any(axis=-1).mean() > 0.9
    assert "Mask blur: 4" in result.infotexts[0]


def test_inverted_mask_regenerates_the_outside(engine: Engine) -> None:
    init, mask = image(32, 2), square_mask(32, 8, 24)
    result = engine.generate(request(init, mask, inpainting_mask_invert=True, mask_blur_x=0, mask_blur_y=0))
    out, original = np.asarray(result.images[0]), np.asarray(init)
    assert np.array_equal(out[mask == 255], original[mask == 255])
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]


def test_only_masked_pastes_back_into_the_full_image(engine: Engine) -> None:
    init, mask = image(48, 3), square_mask(48, 30, 40)
    req = request(
        init,
        mask,
        width=16,
        height=16,
        inpaint_full_res=True,
        inpaint_full_res_padding=2,
        mask_blur_x=0,
        mask_blur_y=0,
    )
    result = engine.generate(req)
    out, original = np.asarray(result.images[0]), np.asarray(init)
    assert result.images[0].size == (48, 48)
    # Crop region: bbox (30, 30, 40, 40) + 2 -> (28, 28, 42, 42), already square.
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert (out[30:40, 30:40] != original[30:40, 30:40]).any(axis=-1).mean() > 0.9
    assert "Inpaint area: Only masked" in result.infotexts[0]
    assert "Masked area padding: 2" in result.infotexts[0]


def test_only_masked_with_empty_mask_is_plain_img2img(engine: Engine) -> None:
    init = image(32, 4)
    empty = np.zeros((32, 32), dtype=np.uint8)
    masked = engine.generate(request(init, empty, inpaint_full_res=True))
    plain = engine.generate(request(init, empty).replace(mask=None))
    assert np.array_equal(np.asarray(masked.images[0]), np.asarray(plain.images[0]))


def test_inpainting_checkpoint_gets_mask_and_masked_image(
    inpainting_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = inpainting_engine
    seen: list[torch.Tensor] = []
    real = engine._unet_eps

    def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return real(x, t, context)

    monkeypatch.setattr(engine, "_unet_eps", spy)
    init, mask = image(32, 5), square_mask(32, 8, 24)
    result = engine.generate(request(init, mask, mask_blur_x=0, mask_blur_y=0))
    assert seen and all(x.shape[1] == 9 for x in seen)
    # Channel 4 is the mask at latent size (nearest): the 16x16 square becomes cells 4..11.
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1
    for x in seen:
        for row in x:
            torch.testing.assert_close(row[4], expected)
    out, original = np.asarray(result.images[0]), np.asarray(init)
    assert np.array_equal(out[mask == 0], original[mask == 0])
    assert "Conditional mask weight: 1.0" in result.infotexts[0]


def test_inpainting_checkpoint_runs_txt2img_with_full_mask(inpainting_engine: Engine) -> None:
    result = inpainting_engine.generate(GenerationRequest(prompt="x", seed=1, steps=2, width=16, height=16))
    assert result.images[0].size == (16, 16)

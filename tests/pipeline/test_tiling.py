"""Tiling through the Engine: seamless pictures from circular padding (A1111's "Tiling")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from voidprompt.infotext import parse_generation_parameters, request_fields_from_params
from voidprompt.models.load import load_model
from voidprompt.pipeline import engine as engine_module
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.rng import ImageRNG

BASE = GenerationRequest(
    prompt="a tile", seed=7, steps=3, width=64, height=64, sampler_name="Euler", cfg_scale=5.0
)


@pytest.fixture(scope="module")
def f8_engine(tiny_f8_checkpoint: Path) -> Engine:
    """The tiny UNet (one 2x downsampling) over a VAE that upsamples by 8, as SD's does."""
    return Engine(load_model(tiny_f8_checkpoint))


def _decoded(
    engine: Engine, request: GenerationRequest, monkeypatch: pytest.MonkeyPatch, roll: tuple[int, int]
) -> torch.Tensor:
    """The float pixels the engine decodes for ``request`` when every noise draw is rolled by
    ``roll`` latent cells."""
    captured: dict[str, torch.Tensor] = {}
    decode = engine_module.decode_latents

    class RolledRNG(ImageRNG):
        def next(self) -> torch.Tensor:
            return torch.roll(super().next(), shifts=roll, dims=(2, 3))

    def spy(components: Any, latents: torch.Tensor, **options: Any) -> torch.Tensor:
        captured["pixels"] = decode(components, latents, **options)
        return captured["pixels"]

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, "ImageRNG", RolledRNG)
        patch.setattr(engine_module, "decode_latents", spy)
        engine.generate(request)
    return captured["pixels"]


def _largest_roll_error(engine: Engine, request: GenerationRequest, monkeypatch: pytest.MonkeyPatch) -> float:
    cells = (2, 4)  # multiples of the tiny UNet's total downsampling (2)
    plain = _decoded(engine, request, monkeypatch, (0, 0))
    rolled = _decoded(engine, request, monkeypatch, cells)
    factor = engine_module.latent_factor(engine.components)
    assert factor == 8
    expected = torch.roll(plain, shifts=(cells[0] * factor, cells[1] * factor), dims=(2, 3))
    return float((rolled - expected).abs().max())


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_rolled_noise_rolls_the_tiled_picture(
    f8_engine: Engine, monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    request = BASE.replace(sampler_name=sampler)
    assert _largest_roll_error(f8_engine, request.replace(tiling=True), monkeypatch) < 1e-4
    # Without tiling the edges are zero-padded and the same roll gives another picture.
    assert _largest_roll_error(f8_engine, request, monkeypatch) > 1e-2


def test_tiling_off_is_untouched_and_the_switch_is_undone(f8_engine: Engine) -> None:
    def pixels(request: GenerationRequest) -> np.ndarray:
        return np.asarray(f8_engine.generate(request).images[0])

    before = pixels(BASE)
    tiled = f8_engine.generate(BASE.replace(tiling=True))
    after = pixels(BASE)
    assert np.array_equal(before, after)
    assert not np.array_equal(before, np.asarray(tiled.images[0]))
    modes = {
        m.padding_mode
        for m in [*f8_engine.components.unet.modules(), *f8_engine.components.vae.modules()]
        if isinstance(m, torch.nn.Conv2d)
    }
    assert modes == {"zeros"}

    # The infotext says so, and reading it back asks for tiling again.
    assert ", Tiling: True" in tiled.infotexts[0]
    assert "Tiling" not in f8_engine.generate(BASE).infotexts[0]
    fields = request_fields_from_params(parse_generation_parameters(tiled.infotexts[0]))
    assert fields["tiling"] is True
    again = f8_engine.generate(BASE.replace(**fields))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(tiled.images[0]))


def test_img2img_with_tiling_runs_and_differs(f8_engine: Engine) -> None:
    source = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    request = BASE.replace(init_images=(source,), denoising_strength=0.5)
    plain = np.asarray(f8_engine.generate(request).images[0])
    tiled = f8_engine.generate(request.replace(tiling=True))
    assert not np.array_equal(plain, np.asarray(tiled.images[0]))
    assert "Tiling: True" in tiled.infotexts[0]


def test_hires_fix_runs_tiled_end_to_end(f8_engine: Engine) -> None:
    request = BASE.replace(enable_hr=True, hr_scale=2.0, denoising_strength=0.5, hr_second_pass_steps=2)
    plain = f8_engine.generate(request).images[0]
    tiled = f8_engine.generate(request.replace(tiling=True))
    assert tiled.images[0].size == plain.size == (128, 128)
    assert not np.array_equal(np.asarray(plain), np.asarray(tiled.images[0]))
    assert "Tiling: True" in tiled.infotexts[0] and "Hires upscale: 2" in tiled.infotexts[0]
    modules = [*f8_engine.components.unet.modules(), *f8_engine.components.vae.modules()]
    assert {m.padding_mode for m in modules if isinstance(m, torch.nn.Conv2d)} == {"zeros"}

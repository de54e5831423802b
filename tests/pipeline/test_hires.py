"""Hires fix: target size arithmetic, latent upscale modes, and the second pass in the Engine."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import pytest
import torch

import voidprompt.pipeline.engine as engine_module
from voidprompt.errors import InvalidRequestError
from voidprompt.models.load import load_model
from voidprompt.pipeline import hires
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.rng import ImageRNG
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_checkpoint(Path(tmp_path_factory.mktemp("hires")) / "tiny.safetensors")
    return Engine(load_model(path))


@dataclasses.dataclass
class Pass:
    x: torch.Tensor
    sigmas: torch.Tensor
    out: torch.Tensor
    unet_shapes: list[torch.Size] = dataclasses.field(default_factory=list)


@pytest.fixture
def passes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Pass]:
    """Per sampler run: its start latent, sigmas, result and the shapes of its UNet calls."""
    runs: list[Pass] = []
    unet_shapes: list[torch.Size] = []
    real_resolve = engine_module.resolve
    real_unet = engine._unet_eps

    def resolve(name: str, scheduler: str | None = None) -> Any:
        spec, sched = real_resolve(name, scheduler)
        inner = spec.function

        @functools.wraps(inner)
        def spy(model: Any, x: torch.Tensor, sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            unet_shapes.clear()
            out = inner(model, x, sigmas, *args, **kwargs)
            runs.append(Pass(x.clone(), sigmas.clone(), out.clone(), list(unet_shapes)))
            return out

        return dataclasses.replace(spec, function=spy), sched

    def unet(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        unet_shapes.append(x.shape)
        return real_unet(x, t, context)

    monkeypatch.setattr(engine_module, "resolve", resolve)
    monkeypatch.setattr(engine, "_unet_eps", unet)
    return runs


BASE = GenerationRequest(prompt="a green hill", seed=5, steps=3, width=32, height=32, enable_hr=True)


# -- target size (A1111 calculate_target_resolution), by hand -------------------------------------


def test_target_from_scale() -> None:
    target = hires.hires_target(GenerationRequest(width=512, height=768, hr_scale=1.5, enable_hr=True))
    assert target == hires.HiresTarget(768, 1152, 0, 0)
    target = hires.hires_target(GenerationRequest(width=504, height=512, hr_scale=1.3, enable_hr=True))
    assert target == hires.HiresTarget(int(504 * 1.3), int(512 * 1.3))  # 655 x 665: truncated, not rounded


def test_target_from_resize_one_side() -> None:
    r = GenerationRequest(width=512, height=768, enable_hr=True)
    assert hires.hires_target(r.replace(hr_resize_x=1024)) == hires.HiresTarget(1024, 1024 * 768 // 512)
    assert hires.hires_target(r.replace(hr_resize_y=1000)) == hires.HiresTarget(1000 * 512 // 768, 1000)


def test_target_from_resize_both_sides_truncates_in_latent_space() -> None:
    r = GenerationRequest(width=512, height=512, enable_hr=True, hr_resize_x=1024, hr_resize_y=768)
    # Source 1:1 is narrower than 4:3: cover the width (1024 x 1024), cut (1024 - 768) / 8 = 32 rows.
    assert hires.hires_target(r) == hires.HiresTarget(1024, 1024, 0, 32)
    r = GenerationRequest(width=768, height=512, enable_hr=True, hr_resize_x=1024, hr_resize_y=1024)
    # Source 3:2 is wider than 1:1: cover the height (1536 x 1024), cut (1536 - 1024) / 8 = 64 columns.
    assert hires.hires_target(r) == hires.HiresTarget(1536, 1024, 64, 0)


def test_truncate_latent_takes_the_odd_cell_from_the_far_side() -> None:
    latent = torch.arange(16.0).reshape(1, 1, 1, 16).expand(1, 4, 2, 16)
    cut = hires.truncate_latent(latent, 3, 0)
    assert cut.shape == (1, 4, 2, 13)
    assert cut[0, 0, 0].tolist() == list(range(1, 14))  # 1 column from the left, 2 from the right


@pytest.mark.parametrize("mode", list(hires.LATENT_UPSCALE_MODES))
def test_latent_upscale_modes_shapes(mode: str) -> None:
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert hires.upscale_latent(latent, mode, 12, 20).shape == (2, 4, 12, 20)
    constant = torch.full((1, 4, 8, 8), 0.25)
    torch.testing.assert_close(hires.upscale_latent(constant, mode, 16, 16), torch.full((1, 4, 16, 16), 0.25))


def test_nearest_modes_repeat_cells_at_integer_scale() -> None:
    latent = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = latent.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    for mode in ("Latent (nearest)", "Latent (nearest-exact)"):
        torch.testing.assert_close(hires.upscale_latent(latent, mode, 8, 8), expected, rtol=0, atol=0)


def test_unknown_upscaler_lists_the_valid_ones(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match=r"hr_upscaler='SwinIR 4x'.*Latent \(bicubic\).*Lanczos"):
        engine.generate(BASE.replace(hr_upscaler="SwinIR 4x"))
    # A1111's own ESRGAN name without its file: which file to place where.
    with pytest.raises(InvalidRequestError, match=r"hr_upscaler='ESRGAN_4x'.*ESRGAN_4x\.pth; place it in"):
        engine.generate(BASE.replace(hr_upscaler="ESRGAN_4x"))


# -- the second pass in the Engine -----------------------------------------------------------------


def test_hires_runs_exactly_its_steps_at_the_hires_shape(engine: Engine, passes: list[Pass]) -> None:
    result = engine.generate(BASE.replace(hr_scale=1.5, hr_second_pass_steps=4))
    first, second = passes
    assert [s[-2:] for s in first.unet_shapes] == [(16, 16)] * 3  # 32 px / latent factor 2
    assert [s[-2:] for s in second.unet_shapes] == [(24, 24)] * 4  # int(32 * 1.5) = 48 px
    assert result.images[0].size == (48, 48)
    assert "Hires upscale: 1.5" in result.infotexts[0] and "Hires steps: 4" in result.infotexts[0]
    assert "Denoising strength: 0.7" in result.infotexts[0]  # the hires default


def test_hires_sigmas_and_noise_follow_a1111(engine: Engine, passes: list[Pass]) -> None:
    engine.generate(
        BASE.replace(hr_second_pass_steps=4, denoising_strength=0.7, hr_upscaler="Latent (nearest)")
    )
    first, second = passes
    # Fixed steps: the schedule has int(4 / 0.7) = 5 steps; the last 4 run (t_enc = 3 -> sigmas[1:]).
    engine.generate(BASE.replace(steps=5, enable_hr=False))
    full = passes[-1].sigmas
    torch.testing.assert_close(second.sigmas, full[1:], rtol=0, atol=0)
    # The start: the upscaled first pass plus NEW noise from the same seed at the hires shape.
    upscaled = first.out.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    noise = ImageRNG((4, 32, 32), [BASE.seed]).next()
    torch.testing.assert_close(second.x, upscaled + noise * full[1])


def test_hires_resize_both_sides_truncates(engine: Engine, passes: list[Pass]) -> None:
    result = engine.generate(BASE.replace(hr_resize_x=48, hr_resize_y=32, hr_second_pass_steps=2))
    # 1:1 source, 3:2 target: cover the width (48 x 48), cut (48 - 32) / 2 = 8 latent rows.
    assert [s[-2:] for s in passes[1].unet_shapes] == [(16, 24)] * 2
    assert result.images[0].size == (48, 32)
    assert "Hires resize: 48x32" in result.infotexts[0]


def test_hires_pixel_upscaler(engine: Engine, passes: list[Pass]) -> None:
    result = engine.generate(BASE.replace(hr_upscaler="Lanczos", hr_scale=2, hr_second_pass_steps=2))
    assert [s[-2:] for s in passes[1].unet_shapes] == [(32, 32)] * 2
    assert result.images[0].size == (64, 64)
    assert "Hires upscaler: Lanczos" in result.infotexts[0]


def test_hires_sampler_and_prompt(engine: Engine, passes: list[Pass]) -> None:
    req = BASE.replace(hr_second_pass_steps=2, hr_sampler_name="Heun", hr_prompt="a [red:blue:1.5] hill")
    result = engine.generate(req)
    # Heun: 2 model calls per step except the last one down to sigma 0.
    assert len(passes[1].unet_shapes) == 3
    assert "Hires sampler: Heun" in result.infotexts[0]
    assert 'Hires prompt: "a [red:blue:1.5] hill"' in result.infotexts[0]


def test_hires_conditioning_uses_hires_timeline(engine: Engine) -> None:
    req = BASE.replace(hr_second_pass_steps=4, hr_prompt="a [red:blue:1.5] hill")
    spec, _ = engine_module.resolve("Euler")
    cond = engine._conditioning(req, spec, hires_spec=spec, hires_steps=4)
    # 1.5 = half-way through the 4 hires steps (A1111's hires prompt-editing offsets).
    assert cond.prepared.positive[0][0] == [(2, "a red hill"), (4, "a blue hill")]
    # Heun in the hires pass counts 2 calls per step: the switch moves to call 4 of 8.
    heun, _ = engine_module.resolve("Heun")
    cond = engine._conditioning(req, spec, hires_spec=heun, hires_steps=4)
    assert cond.prepared.positive[0][0] == [(4, "a red hill"), (8, "a blue hill")]
    # An empty hr_prompt reuses the first pass's prompt.
    cond = engine._conditioning(req.replace(hr_prompt=""), spec, hires_spec=spec, hires_steps=4)
    assert cond.prepared.positive[0][0] == [(4, "a green hill")]

"""DPM fast / DPM adaptive: the sigma range and step count A1111 1.10 hands them.

A1111's ``KDiffusionSampler.sample`` (txt2img) passes ``model_wrap.sigmas[0]`` / ``[-1]`` (the model's
whole discrete range) and ``n = steps`` whatever the schedule; ``sample_img2img`` (img2img and the
hires pass) passes the truncated schedule's ``sigma_sched[-2]`` / ``sigma_sched[0]`` and
``n = len(sigma_sched) - 1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from voidprompt.pipeline.run_sampler import (
    Img2ImgStart,
    SamplerPass,
    SamplerStart,
    SamplingModel,
    run_sampler,
)
from voidprompt.request import GenerationRequest
from voidprompt.sampling.denoiser import DiscreteEpsDenoiser
from voidprompt.sampling.registry import compute_sigmas, get_sampler, get_scheduler
from voidprompt.sampling.rng import ImageRNG


def _sd1_alphas_cumprod() -> torch.Tensor:
    # SD1's "scaled linear" beta schedule over 1000 training steps.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).float()


def _run(
    sampler: str,
    scheduler: str,
    *,
    img2img: Img2ImgStart | None = None,
    request: GenerationRequest | None = None,
) -> tuple[dict[str, Any], Any]:
    seen: dict[str, Any] = {}

    def spy(model: Any, x: torch.Tensor, sigma_min: float, sigma_max: float, n: int, *,
            callback: Any = None, noise_sampler: Any = None) -> torch.Tensor:
        seen.update(sigma_min=sigma_min, sigma_max=sigma_max, n=n)
        return x

    spec = dataclasses.replace(get_sampler(sampler), function=spy)
    abar = _sd1_alphas_cumprod()
    schedule_model = DiscreteEpsDenoiser(lambda x, t, c: torch.zeros_like(x), abar)
    model = SamplingModel(lambda x, s: x, schedule_model, abar)
    rng = ImageRNG((4, 8, 8), [1])
    init = torch.zeros(1, 4, 8, 8) if img2img is not None else None
    start = SamplerStart(rng.next(), rng, [1], init, img2img)
    run_sampler(SamplerPass(spec, get_scheduler(scheduler), 10), model, start, request or GenerationRequest())
    return seen, schedule_model


@pytest.mark.parametrize("sampler", ["DPM fast", "DPM adaptive"])
@pytest.mark.parametrize("scheduler", ["Karras", "Align Your Steps", "SGM Uniform", "Automatic"])
def test_txt2img_passes_the_models_whole_range(sampler: str, scheduler: str) -> None:
    # Schedule overrides shape the schedule A1111 computes, which DPM fast / adaptive then ignore.
    overrides = GenerationRequest(sigma_min=0.5, sigma_max=5.0)
    seen, schedule_model = _run(sampler, scheduler, request=overrides)
    # SD1's table: sigma_min = sqrt((1 - abar[0]) / abar[0]) ~ 0.0292, sigma_max ~ 14.61.
    assert seen["sigma_min"] == pytest.approx(float(schedule_model.sigmas[0]))
    assert seen["sigma_max"] == pytest.approx(float(schedule_model.sigmas[-1]))
    assert seen["sigma_min"] == pytest.approx(0.0292, abs=1e-4)
    assert seen["sigma_max"] == pytest.approx(14.6146, abs=1e-3)
    assert seen["n"] == 10


def test_img2img_passes_the_truncated_schedule() -> None:
    start = Img2ImgStart.for_strength(10, 0.5, fixed_steps=False)  # 10-entry schedule, t_enc 5
    seen, schedule_model = _run("DPM fast", "Karras", img2img=start)
    sched = compute_sigmas(get_sampler("DPM fast"), get_scheduler("Karras"), 10, schedule_model)
    sched = sched[10 - 5 - 1 :]  # A1111's sigma_sched = sigmas[steps - t_enc - 1:]: 6 sigmas + the final 0
    assert len(sched) == 7
    assert seen["sigma_max"] == pytest.approx(float(sched[0]))
    assert seen["sigma_min"] == pytest.approx(float(sched[-2]))
    assert seen["n"] == 6


def test_beta_shape_reaches_the_schedule() -> None:
    # The request's beta_dist_alpha / beta_dist_beta are the Beta schedule's shape (A1111's
    # beta_dist_alpha / beta_dist_beta options); its default 0.6 / 0.6 is another schedule.
    seen: dict[str, torch.Tensor] = {}

    def spy(model: Any, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Any = None,
            noise_sampler: Any = None) -> torch.Tensor:
        seen["sigmas"] = sigmas
        return x

    spec = dataclasses.replace(get_sampler("Euler"), function=spy)
    abar = _sd1_alphas_cumprod()
    schedule_model = DiscreteEpsDenoiser(lambda x, t, c: torch.zeros_like(x), abar)
    model = SamplingModel(lambda x, s: x, schedule_model, abar)
    rng = ImageRNG((4, 8, 8), [1])
    request = GenerationRequest(beta_dist_alpha=0.3, beta_dist_beta=0.9)
    beta = get_scheduler("Beta")
    run_sampler(SamplerPass(spec, beta, 8), model, SamplerStart(rng.next(), rng, [1]), request)
    expected = compute_sigmas(spec, beta, 8, schedule_model, beta_alpha=0.3, beta_beta=0.9)
    torch.testing.assert_close(seen["sigmas"], expected, rtol=0, atol=0)
    default = compute_sigmas(spec, beta, 8, schedule_model)
    assert not torch.allclose(expected, default)

"""Our samplers against k-diffusion's own functions: same denoiser, sigmas and noise, float64."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from kdiff_oracle import kdiff_external, kdiff_sampling, patched_randn
from sd_fixtures import sd1_alphas_cumprod

from voidprompt.sampling import samplers as S
from voidprompt.sampling import schedules
from voidprompt.sampling.denoiser import DiscreteEpsDenoiser

K = kdiff_sampling()


def nonlinear_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, non-affine stand-in for a network, so every coefficient matters."""
    sig = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (1 / (1 + sig**2)) + 0.1 * torch.sin(3 * x) * sig / (1 + sig)


def noise_list(n: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n)]


def from_list(noises: list[torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
    it = iter(noises)
    return lambda s, sn: next(it)


SHAPE = (2, 3, 4, 4)
SIGMAS = schedules.karras(9, 0.0292, 14.6146).double()


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6146


# (our fn, k-diffusion name, knobs, noise via "randn" (patched torch) or "sampler" (noise_sampler))
CASES: list[tuple[str, Callable[..., torch.Tensor], str, dict[str, Any], str]] = [
    ("euler", S.sample_euler, "sample_euler", {}, "randn"),
    (
        "euler_churn",
        S.sample_euler,
        "sample_euler",
        {"s_churn": 3.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003},
        "randn",
    ),
    ("heun", S.sample_heun, "sample_heun", {}, "randn"),
    ("heun_churn", S.sample_heun, "sample_heun", {"s_churn": 2.0, "s_noise": 0.9}, "randn"),
    ("dpm2", S.sample_dpm_2, "sample_dpm_2", {}, "randn"),
    ("dpm2_churn", S.sample_dpm_2, "sample_dpm_2", {"s_churn": 5.0, "s_tmin": 0.5}, "randn"),
    ("lms", S.sample_lms, "sample_lms", {}, "randn"),
    ("dpmpp_2m", S.sample_dpmpp_2m, "sample_dpmpp_2m", {}, "randn"),
    ("euler_a", S.sample_euler_ancestral, "sample_euler_ancestral", {}, "sampler"),
    (
        "euler_a_eta",
        S.sample_euler_ancestral,
        "sample_euler_ancestral",
        {"eta": 0.6, "s_noise": 1.1},
        "sampler",
    ),
    ("dpm2_a", S.sample_dpm_2_ancestral, "sample_dpm_2_ancestral", {}, "sampler"),
    ("dpmpp_2s_a", S.sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", {"eta": 0.8}, "sampler"),
    ("dpmpp_sde", S.sample_dpmpp_sde, "sample_dpmpp_sde", {}, "sampler"),
    ("dpmpp_sde_r", S.sample_dpmpp_sde, "sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}, "sampler"),
    ("dpmpp_2m_sde", S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {}, "sampler"),
    ("dpmpp_2m_sde_heun", S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"solver_type": "heun"}, "sampler"),
    ("dpmpp_2m_sde_eta0", S.sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", {"eta": 0.0}, "sampler"),
    ("dpmpp_3m_sde", S.sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", {}, "sampler"),
    (
        "dpmpp_3m_sde_eta",
        S.sample_dpmpp_3m_sde,
        "sample_dpmpp_3m_sde",
        {"eta": 0.4, "s_noise": 0.95},
        "sampler",
    ),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "knobs", "noise_mode"), CASES, ids=[c[0] for c in CASES])
def test_trajectory_matches_kdiffusion(
    name: str, ours: Callable[..., torch.Tensor], theirs: str, knobs: dict[str, Any], noise_mode: str
) -> None:
    noises = noise_list(40, SHAPE, seed=7)
    ours_steps: list[torch.Tensor] = []
    theirs_steps: list[torch.Tensor] = []
    got = ours(
        nonlinear_denoiser,
        start(),
        SIGMAS,
        noise_sampler=from_list(noises),
        callback=lambda d: ours_steps.append(d["denoised"]),
        **knobs,
    )
    fn = getattr(K, theirs)
    kd_cb = {"callback": lambda d: theirs_steps.append(d["denoised"]), "disable": True}
    if noise_mode == "randn":
        with patched_randn(noises):
            want = fn(nonlinear_denoiser, start(), SIGMAS, **kd_cb, **knobs)
    else:
        want = fn(nonlinear_denoiser, start(), SIGMAS, noise_sampler=from_list(noises), **kd_cb, **knobs)
    assert len(ours_steps) == len(theirs_steps) == len(SIGMAS) - 1
    for a, b in zip(ours_steps, theirs_steps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_euler_draws_noise_every_step_even_without_churn() -> None:
    drawn: list[tuple[float, float]] = []

    def sampler(s: torch.Tensor, sn: torch.Tensor) -> torch.Tensor:
        drawn.append((float(s), float(sn)))
        return torch.zeros(SHAPE, dtype=torch.float64)

    for fn in (S.sample_euler, S.sample_heun, S.sample_dpm_2):
        drawn.clear()
        fn(nonlinear_denoiser, start(), SIGMAS, noise_sampler=sampler)
        assert len(drawn) == len(SIGMAS) - 1


def test_dpm_fast_and_adaptive_match_kdiffusion() -> None:
    noises = noise_list(200, SHAPE, seed=3)
    for eta in (0.0, 1.0):
        got = S.sample_dpm_fast(
            nonlinear_denoiser, start(), 0.0292, 14.6146, 10, eta=eta, noise_sampler=from_list(noises)
        )
        want = K.sample_dpm_fast(
            nonlinear_denoiser,
            start(),
            0.0292,
            14.6146,
            10,
            eta=eta,
            disable=True,
            noise_sampler=from_list(noises),
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        got = S.sample_dpm_adaptive(
            nonlinear_denoiser, start(), 0.0292, 14.6146, eta=eta, noise_sampler=from_list(noises)
        )
        want = K.sample_dpm_adaptive(
            nonlinear_denoiser,
            start(),
            0.0292,
            14.6146,
            eta=eta,
            disable=True,
            noise_sampler=from_list(noises),
        )
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_lms_coefficients_are_exact_integrals() -> None:
    # Order 2 at i=1, step 7 -> 3: basis (tau - 10)/(7 - 10) for d_1 and (tau - 7)/(10 - 7) for d_0.
    arr = np.array([10.0, 7.0, 3.0])
    c0 = S.lms_coefficient(2, arr, 1, 0)
    c1 = S.lms_coefficient(2, arr, 1, 1)
    want0 = ((3 - 10) ** 2 - (7 - 10) ** 2) / 2 / (7 - 10)
    want1 = ((3 - 7) ** 2 - 0) / 2 / (10 - 7)
    assert math.isclose(c0, want0, rel_tol=1e-14) and math.isclose(c1, want1, rel_tol=1e-14)
    assert math.isclose(c0 + c1, 3 - 7, rel_tol=1e-14)  # the basis sums to 1


def test_schedules_match_kdiffusion() -> None:
    for n in (1, 2, 10, 37):
        torch.testing.assert_close(
            schedules.karras(n, 0.0292, 14.6146), K.get_sigmas_karras(n, 0.0292, 14.6146)
        )
        torch.testing.assert_close(schedules.karras(n, 0.1, 10, 3.0), K.get_sigmas_karras(n, 0.1, 10, 3.0))
        torch.testing.assert_close(
            schedules.exponential(n, 0.0292, 14.6146), K.get_sigmas_exponential(n, 0.0292, 14.6146)
        )
        torch.testing.assert_close(
            schedules.polyexponential(n, 0.0292, 14.6146, 2.0),
            K.get_sigmas_polyexponential(n, 0.0292, 14.6146, 2.0),
        )


def test_discrete_denoiser_matches_kdiffusion_compvis() -> None:
    ac = sd1_alphas_cumprod()
    unet = lambda x, t, ctx: torch.sin(x) * (t / 1000).reshape(-1, 1, 1, 1) + ctx.mean()  # noqa: E731
    ours = DiscreteEpsDenoiser(unet, ac)
    theirs = kdiff_external().DiscreteEpsDDPMDenoiser(unet, ac, quantize=False)
    for n in (2, 20, 33):
        torch.testing.assert_close(ours.get_sigmas(n), theirs.get_sigmas(n))
    sig = torch.tensor([0.0292, 0.03, 0.5, 1.0, 7.3, 14.6146, 20.0, 0.01])
    torch.testing.assert_close(ours.sigma_to_t(sig), theirs.sigma_to_t(sig))
    torch.testing.assert_close(ours.sigma_to_t(sig, quantize=True), theirs.sigma_to_t(sig, quantize=True))
    t = torch.tensor([0.0, 0.5, 10.25, 998.9, 999.0])
    torch.testing.assert_close(ours.t_to_sigma(t), theirs.t_to_sigma(t))
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ctx = torch.full((2, 77, 8), 0.25)
    s2 = torch.tensor([3.0, 0.7])
    torch.testing.assert_close(ours(x, s2, context=ctx), theirs(x, s2, ctx=ctx))
    assert math.isclose(float(ours.sigma_min), math.sqrt((1 - float(ac[0])) / float(ac[0])), rel_tol=1e-6)

"""Names both ways, A1111's get_sigmas rules, closed-form schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from sd_fixtures import sd1_alphas_cumprod

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling import registry, schedules
from voidprompt.sampling.denoiser import DiscreteEpsDenoiser

MODEL = DiscreteEpsDenoiser(lambda x, t, c: x, sd1_alphas_cumprod())


@pytest.mark.parametrize(
    ("name", "sched", "want"),
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Automatic")),
        ("DPM++ 2M", "Karras", ("DPM++ 2M", "Automatic")),
        ("DPM++ 2M", "Exponential", ("DPM++ 2M", "Exponential")),
        ("Euler a", None, ("Euler a", "Automatic")),
        ("Euler Karras", None, ("Euler", "Karras")),
        ("DPM++ 2M SDE Exponential", None, ("DPM++ 2M SDE", "Automatic")),
        ("DPM++ 2M SDE Karras", None, ("DPM++ 2M SDE", "Karras")),
        ("DPM++ 2M SDE Heun Karras", "Uniform", ("DPM++ 2M SDE Heun", "Karras")),
        ("k_dpmpp_2m_ka", None, ("DPM++ 2M", "Automatic")),
        ("k_lms_ka", None, ("LMS", "Karras")),
        ("k_euler_a", None, ("Euler a", "Automatic")),
        ("LMS", "sgm_uniform", ("LMS", "SGM Uniform")),
        ("DDIM", None, ("DDIM", "Automatic")),
    ],
)
def test_resolve_names(name: str, sched: str | None, want: tuple[str, str]) -> None:
    sampler, scheduler = registry.resolve(name, sched)
    assert (sampler.label, scheduler.label) == want


def test_split_sampler_name() -> None:
    split = registry.split_sampler_name
    assert split("DPM++ 2M SDE Heun Exponential") == ("DPM++ 2M SDE Heun", "Exponential")
    assert split("k_dpmpp_2m_sde_exp") == ("DPM++ 2M SDE", "Exponential")
    assert split("DDIM") == ("DDIM", None)
    assert split("Heun sgm_uniform") == ("Heun", "SGM Uniform")
    # A1111 quirk: schedulers are tried in table order, so "Uniform" is cut off before "SGM Uniform"
    # is tried, and the rest is no sampler.
    assert split("Heun SGM Uniform") == ("Heun SGM", "Uniform")
    assert registry.split_sampler_name("Nonsense") == ("Nonsense", None)


def test_unknown_names_list_the_choices() -> None:
    with pytest.raises(InvalidRequestError, match="Euler a"):
        registry.resolve("Euler b")
    with pytest.raises(InvalidRequestError, match="Align Your Steps"):
        registry.resolve("Euler", "Cosine")
    with pytest.raises(InvalidRequestError, match="Cosine"):
        registry.resolve("Euler Karras", "Cosine")


def test_infotext_names() -> None:
    assert registry.infotext_names("DPM++ 2M Karras") == {"Sampler": "DPM++ 2M", "Schedule type": "Karras"}
    assert registry.infotext_names("Euler") == {"Sampler": "Euler", "Schedule type": "Automatic"}
    assert registry.infotext_names("Euler", "Uniform") == {"Sampler": "Euler", "Schedule type": "Uniform"}
    for spec in registry.SAMPLERS:  # every label round-trips
        assert registry.resolve(spec.label)[0] is spec


def test_compute_sigmas_rules() -> None:
    dpm2, auto = registry.resolve("DPM2")
    got = registry.compute_sigmas(dpm2, auto, 10, MODEL)
    full = schedules.karras(11, float(MODEL.sigmas[0]), float(MODEL.sigmas[-1]))
    assert torch.equal(got, torch.cat([full[:-2], full[-1:]])) and len(got) == 11
    euler, auto = registry.resolve("Euler")
    assert torch.equal(registry.compute_sigmas(euler, auto, 7, MODEL), MODEL.get_sigmas(7))
    old = registry.compute_sigmas(
        *registry.resolve("DPM++ 2M"), 5, MODEL, use_old_karras_scheduler_sigmas=True
    )
    assert math.isclose(float(old[0]), 10.0, rel_tol=1e-6) and math.isclose(float(old[-2]), 0.1, rel_tol=1e-5)
    rho = registry.compute_sigmas(*registry.resolve("DPM++ 2M"), 5, MODEL, rho=3.0, sigma_max=5.0)
    assert torch.allclose(rho, schedules.karras(5, float(MODEL.sigmas[0]), 5.0, 3.0))


def test_closed_form_schedules() -> None:
    smin, smax = float(MODEL.sigmas[0]), float(MODEL.sigmas[-1])
    kl = schedules.kl_optimal(4, smin, smax)
    want = [math.tan(math.atan(smax) + k / 4 * (math.atan(smin) - math.atan(smax))) for k in range(5)]
    assert np.allclose(kl.numpy(), want, rtol=1e-5) and len(kl) == 5  # ends at sigma_min, no 0
    ays = schedules.align_your_steps(11)
    assert ays.tolist()[:-1] == pytest.approx(schedules.AYS_SD15_SIGMAS) and ays[-1] == 0
    ays20 = schedules.align_your_steps(21)
    assert ays20[0] == pytest.approx(14.615) and ays20[2] == pytest.approx(
        6.475, rel=1e-5
    )  # every 2nd = table
    assert ays20[1] == pytest.approx(math.sqrt(14.615 * 6.475), rel=1e-5)  # log-linear midpoint
    b = schedules.beta(10, smin, smax, 0.6, 0.6)
    want_b = [smin + stats.beta.ppf(q, 0.6, 0.6) * (smax - smin) for q in 1 - np.linspace(0, 1, 10)]
    assert np.allclose(b[:-1].numpy(), want_b, rtol=1e-5)
    for q in (0.01, 0.3, 0.77, 0.999):
        assert math.isclose(schedules.beta_ppf(q, 0.6, 0.6), stats.beta.ppf(q, 0.6, 0.6), rel_tol=1e-10)
        assert math.isclose(schedules.beta_ppf(q, 2.0, 5.0), stats.beta.ppf(q, 2.0, 5.0), rel_tol=1e-10)
    simple = schedules.simple(4, MODEL)
    assert torch.allclose(simple[:-1], MODEL.sigmas[[999, 749, 499, 249]])
    ddim = schedules.ddim(4, MODEL)
    assert torch.allclose(ddim[:-1], MODEL.sigmas[[751, 501, 251, 1]])
    assert len(schedules.ddim(30, MODEL)) == 32  # A1111 quirk: 31 sigmas + 0
    normal = schedules.normal(5, smin, smax, MODEL)
    assert torch.allclose(normal, MODEL.get_sigmas(5), rtol=1e-5)
    sgm = schedules.sgm_uniform(4, smin, smax, MODEL)
    assert torch.allclose(sgm[:-1], MODEL.t_to_sigma(torch.tensor([999.0, 749.25, 499.5, 249.75])), rtol=1e-5)

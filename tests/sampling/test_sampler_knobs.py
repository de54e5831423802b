"""The churn settings each sampler is handed, as A1111 1.10's ``Sampler.initialize`` decides them:
the names ``sampler_extra_params`` lists for the sampler's k-diffusion function, kept only when that
function's signature has them; and the infotext keys that follow."""

from __future__ import annotations

import inspect
import math

import pytest
from kdiff_oracle import kdiff_sampling

from voidprompt.pipeline.run_sampler import sampler_knobs
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import SAMPLERS

# A1111 1.10 modules/sd_samplers_kdiffusion.py, sampler_extra_params, written out by hand.
A1111_EXTRA_PARAMS = {
    "sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
    "sample_dpm_fast": ["s_noise"],
    "sample_dpm_2_ancestral": ["s_noise"],
    "sample_dpmpp_2s_ancestral": ["s_noise"],
    "sample_dpmpp_sde": ["s_noise"],
    "sample_dpmpp_2m_sde": ["s_noise"],
    "sample_dpmpp_3m_sde": ["s_noise"],
}
CHURN = {"s_churn": 0.5, "s_tmin": 0.1, "s_tmax": 9.0, "s_noise": 0.9}


def _function_name(spec) -> str:  # type: ignore[no-untyped-def]
    fn = spec.function
    return getattr(fn, "func", fn).__name__


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.label)
def test_churn_knobs_follow_a1111s_table_and_k_diffusions_signature(spec) -> None:  # type: ignore[no-untyped-def]
    name = _function_name(spec)
    request = GenerationRequest(sampler_name=spec.label, **CHURN)
    knobs = sampler_knobs(spec, request)
    k_sampling = kdiff_sampling()
    if hasattr(k_sampling, name):
        signature = inspect.signature(getattr(k_sampling, name)).parameters
        expected = {p: CHURN[p] for p in A1111_EXTRA_PARAMS.get(name, []) if p in signature}
    else:  # A1111's own samplers (Restart, LCM, the timestep samplers) have no entry
        expected = {}
    assert {k: v for k, v in knobs.items() if k in CHURN} == expected


def test_default_s_tmax_is_infinity_for_the_churn_samplers() -> None:
    euler = next(s for s in SAMPLERS if s.label == "Euler")
    assert sampler_knobs(euler, GenerationRequest(sampler_name="Euler"))["s_tmax"] == math.inf


def test_euler_a_runs_and_records_without_s_noise() -> None:
    # A1111 quirk: sample_euler_ancestral takes s_noise, but A1111 never hands it on.
    euler_a = next(s for s in SAMPLERS if s.label == "Euler a")
    knobs = sampler_knobs(euler_a, GenerationRequest(sampler_name="Euler a", s_noise=0.5))
    assert "s_noise" not in knobs and knobs["eta"] == 1.0

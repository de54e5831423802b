"""The request's own limits, which every front end meets through GenerationRequest.validate."""

from __future__ import annotations

import math

import pytest

from voidprompt.errors import InvalidRequestError
from voidprompt.request import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, GenerationRequest, check_prompt_chars

FLOAT_FIELDS = (
    "subseed_strength",
    "cfg_scale",
    "eta",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "s_min_uncond",
    "sigma_min",
    "sigma_max",
    "rho",
    "denoising_strength",
    "initial_noise_multiplier",
    "inpainting_mask_weight",
    "hr_scale",
)


def test_the_limits_are_the_documented_values() -> None:
    assert (MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS) == (20_000, 8192, 1000)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_number_names_its_field(name: str, value: float) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        GenerationRequest(**{name: value}).validate()
    assert str(caught.value) == f"{name}={value}: must be a finite number"


def test_sides_up_to_the_limit_pass_and_beyond_it_are_refused() -> None:
    GenerationRequest(width=MAX_SIDE, height=8).validate()
    with pytest.raises(InvalidRequestError, match=r"^width=100000 is over the limit of 8192 pixels per side"):
        GenerationRequest(width=100000, height=100000).validate()
    with pytest.raises(InvalidRequestError, match=r"^height=8200 is over the limit of 8192"):
        GenerationRequest(height=8200).validate()


def test_steps_up_to_the_limit_pass_and_beyond_it_are_refused() -> None:
    GenerationRequest(steps=MAX_STEPS, hr_second_pass_steps=MAX_STEPS).validate()
    with pytest.raises(
        InvalidRequestError, match=r"^steps=1000000000 is over the limit of 1000 sampling steps"
    ):
        GenerationRequest(steps=10**9).validate()
    with pytest.raises(InvalidRequestError, match=r"^hr_second_pass_steps=1001 is over the limit of 1000"):
        GenerationRequest(hr_second_pass_steps=1001).validate()


def test_the_prompt_pair_is_limited_together() -> None:
    GenerationRequest(prompt="a" * 15_000, negative_prompt="b" * 5_000).validate()
    with pytest.raises(
        InvalidRequestError,
        match=r"^prompt and negative_prompt are 20001 characters together, over the limit of 20000",
    ):
        GenerationRequest(prompt="a" * 15_000, negative_prompt="b" * 5_001).validate()
    with pytest.raises(InvalidRequestError, match=r"^hr_prompt and hr_negative_prompt are 20001 characters"):
        GenerationRequest(hr_prompt="a" * 20_001).validate()


def test_a_lower_limit_can_be_passed() -> None:
    check_prompt_chars("abc", "de", limit=5)
    with pytest.raises(InvalidRequestError, match="6 characters together, over the limit of 5"):
        check_prompt_chars("abc", "def", limit=5)

"""The Engine reports what its passes did, and the infotext writes A1111's keys from it."""

from __future__ import annotations

import pytest

from voidprompt.infotext import parse_generation_parameters
from voidprompt.pipeline.engine import Engine
from voidprompt.prompts.styles import PromptStyle, StyleDatabase
from voidprompt.request import GenerationRequest

BASE = GenerationRequest(prompt="a cat", negative_prompt="dog", seed=7, steps=2, width=64, height=64,
                         sampler_name="Euler")


def _params(engine: Engine, request: GenerationRequest) -> dict[str, object]:
    return parse_generation_parameters(engine.generate(request).infotexts[0])


@pytest.mark.parametrize(("threshold", "written"), [(100.0, True), (0.001, False)])
def test_ngms_written_only_when_the_skip_triggered(
    tiny_engine: Engine, threshold: float, written: bool
) -> None:
    # Euler's 2 calls run at sigmas ~14.6 and ~0.03 (the model's range): the odd call is
    # below 100 (the skip triggers), none is below 0.001.
    params = _params(tiny_engine, BASE.replace(s_min_uncond=threshold))
    assert (params.get("NGMS") == str(threshold)) is written
    assert ("NGMS" in params) is written


def test_pad_conds_written_only_when_padding_happened(tiny_engine: Engine) -> None:
    same_length = _params(tiny_engine, BASE.replace(pad_cond_uncond=True))
    assert "Pad conds" not in same_length
    # 80 words: two 75-token chunks against the negative prompt's one, so the uncond is padded.
    long_prompt = BASE.replace(prompt=" ".join(["cat"] * 80), pad_cond_uncond=True)
    assert _params(tiny_engine, long_prompt)["Pad conds"] == "True"


def test_hires_automatic_schedule_writes_nothing(tiny_engine: Engine) -> None:
    request = BASE.replace(
        sampler_name="DPM++ 2M", enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
        hr_scheduler="Automatic",
    )
    params = _params(tiny_engine, request)
    assert params["Schedule type"] == "Karras"
    # The parser's default, i.e. the key was not written.
    assert params["Hires schedule type"] == "Use same scheduler"


def test_styles_reach_emphasis_and_the_hires_prompt(tiny_engine: Engine) -> None:
    styles = StyleDatabase([PromptStyle("q", "{prompt}, (masterpiece)", "lowres")])
    engine = Engine(tiny_engine.components, style_db=styles)
    request = BASE.replace(styles=("q",), emphasis="No norm", enable_hr=True, hr_scale=1.5,
                           denoising_strength=0.5, hr_prompt="a dog")
    params = _params(engine, request)
    # The style's bracket is in the encoded text: A1111 writes the emphasis mode.
    assert params["Emphasis"] == "No norm"
    # The styled hires prompt differs from the styled prompt; the negatives are equal once styled.
    assert params["Prompt"] == "a cat, (masterpiece)"
    assert params["Hires prompt"] == "a dog, (masterpiece)"
    assert params["Hires negative prompt"] == ""
    # Without the style nothing in the texts holds a bracket.
    assert "Emphasis" not in _params(engine, BASE.replace(emphasis="No norm"))


def test_hires_only_brackets_count_for_emphasis_from_the_second_iteration(tiny_engine: Engine) -> None:
    # The hires prompt is encoded after the first iteration's parameters are copied from the
    # encoder's record; the second iteration's copy has it.
    request = BASE.replace(emphasis="No norm", enable_hr=True, hr_scale=1.5, denoising_strength=0.5,
                           hr_prompt="a (dog)", n_iter=2)
    first, second = (parse_generation_parameters(t) for t in tiny_engine.generate(request).infotexts)
    assert "Emphasis" not in first and second["Emphasis"] == "No norm"

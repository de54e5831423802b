"""Regenerating from an infotext: fields, and A1111's version-based compatibility switches."""

from __future__ import annotations

import numpy as np

from voidprompt.pipeline.engine import Engine
from voidprompt.pipeline.from_infotext import request_from_infotext
from voidprompt.request import GenerationRequest

OLD = (
    "a [cat:dog:0.5]\nNegative prompt: lowres\n"
    "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
    "Clip skip: 2, ENSD: 31337, Version: v1.5.1"
)


def test_old_version_turns_on_a1111s_compatibility_switches() -> None:
    request = request_from_infotext(OLD)
    assert (request.prompt, request.negative_prompt) == ("a [cat:dog:0.5]", "lowres")
    assert (request.steps, request.sampler_name, request.seed, request.width) == (20, "DDIM", 965400086, 512)
    assert (request.clip_skip, request.eta_noise_seed_delta) == (2, 31337)
    # < 1.6.0 with '[' in the prompt, DDIM, < v1.7.0-225: all three switches.
    assert request.use_old_scheduling
    assert request.pad_cond_uncond_v0
    assert request.use_downcasted_alpha_bar
    # No RNG key: A1111 assumes the GPU source.
    assert request.randn_source == "GPU"


def test_newer_version_and_our_own_turn_nothing_on() -> None:
    for version in ("v1.10.1", "voidprompt-0.1.0"):
        request = request_from_infotext(OLD.replace("v1.5.1", version))
        assert not (
            request.use_old_scheduling or request.pad_cond_uncond_v0 or request.use_downcasted_alpha_bar
        )


def test_overrides_win() -> None:
    assert request_from_infotext(OLD, steps=5, width=64).steps == 5


def test_our_infotext_regenerates_our_image(tiny_engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a [b:c:2]",
        negative_prompt="(lowres:1.1)",
        seed=77,
        steps=4,
        width=64,
        height=64,
        sampler_name="Euler a",
        clip_skip=2,
        eta_noise_seed_delta=31337,
    )
    first = tiny_engine.generate(request)
    again = tiny_engine.generate(request_from_infotext(first.infotexts[0]))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert again.infotexts == first.infotexts

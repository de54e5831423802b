"""Infotext -> GenerationRequest fields (infotext.to_request), the path the HTTP API's infotext takes.

Expected values are derived by hand from A1111's rules: the parsed keys, A1111's legacy sampler
names (``sd_samplers.get_sampler_and_scheduler``) and its version switches (``infotext_versions``).
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from voidprompt.errors import InfotextError
from voidprompt.infotext import request_fields_from_infotext, request_fields_from_params
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import split_sampler_name

OLD = (
    "a [cat:dog:0.5]\nNegative prompt: lowres\n"
    "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
    "Clip skip: 2, ENSD: 31337, Version: v1.5.1"
)


def test_legacy_sampler_names_split() -> None:
    assert split_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Karras")
    assert split_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Exponential")
    assert split_sampler_name("Euler a") == ("Euler a", None)
    assert split_sampler_name("k_lms_ka") == ("LMS", "Karras")
    fields = request_fields_from_params({"Sampler": "DPM2 a Karras", "Schedule type": "Automatic"})
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM2 a", "Karras")
    # A name without a schedule keeps the infotext's "Schedule type".
    fields = request_fields_from_params({"Sampler": "Euler a", "Schedule type": "Uniform"})
    assert (fields["sampler_name"], fields["scheduler"]) == ("Euler a", "Uniform")
    # A1111's own spelling of the schedule (its scheduler name) splits too.
    fields = request_fields_from_params({"Sampler": "DPM++ SDE karras", "Schedule type": "Automatic"})
    assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ SDE", "Karras")


def test_request_mapping_types_and_errors() -> None:
    fields = request_fields_from_params({
        "Steps": "20.0", "Pad conds": "True", "Masked content": "latent noise",
        "Mask mode": "Inpaint not masked",
        "Inpaint area": "Only masked", "Masked area padding": 32, "Mask blur": "8", "Sampler": "DDIM",
        "Eta DDIM": "0.3", "Eta": "0.9",
    })
    assert fields["steps"] == 20 and fields["pad_cond_uncond"] is True
    assert fields["inpainting_fill"] == 2 and fields["inpainting_mask_invert"] is True
    assert fields["inpaint_full_res"] is True and fields["inpaint_full_res_padding"] == 32
    assert fields["mask_blur_x"] == fields["mask_blur_y"] == 8
    assert fields["eta"] == 0.3  # DDIM reads "Eta DDIM", not the ancestral "Eta"
    with pytest.raises(InfotextError, match="Steps"):
        request_fields_from_params({"Steps": "twenty"})
    with pytest.raises(InfotextError, match="Seed"):
        request_fields_from_params({"Seed": "1.5"})
    with pytest.raises(InfotextError, match="Pad conds"):
        request_fields_from_params({"Pad conds": "maybe"})


def test_nan_never_sneaks_in() -> None:
    assert not math.isnan(request_fields_from_params({"CFG scale": "7"})["cfg_scale"])


def test_every_field_is_a_request_field() -> None:
    # Callers hand the fields straight to GenerationRequest: no key may be anything else.
    text = (
        "p [a:b:3]\nNegative prompt: n\nSteps: 9, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 3, "
        "Size: 64x96, Variation seed: 4, Variation seed strength: 0.5, Seed resize from: 64x64, "
        "Denoising strength: 0.4, Clip skip: 2, ENSD: 31337, RNG: CPU, Hires upscale: 2, "
        "Hires steps: 3, Hires upscaler: Latent, Hires sampler: Euler, Hires schedule type: Karras, "
        "Mask blur: 4, Masked content: fill, Inpaint area: Only masked, Noise multiplier: 0.9, "
        "Conditional mask weight: 0.5, Schedule rho: 5, Eta: 0.7, Sigma churn: 0.1, NGMS: 0.2, "
        "Model: m, Model hash: 0123456789, VAE: v, Lora hashes: \"x: 1\", Version: v1.5.0"
    )
    fields = request_fields_from_infotext(text)
    names = {f.name for f in dataclasses.fields(GenerationRequest)}
    assert set(fields) <= names, set(fields) - names
    GenerationRequest(**fields).validate()


def test_old_version_turns_on_a1111s_compatibility_switches() -> None:
    request = GenerationRequest(**request_fields_from_infotext(OLD))
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
        request = GenerationRequest(**request_fields_from_infotext(OLD.replace("v1.5.1", version)))
        assert not (
            request.use_old_scheduling or request.pad_cond_uncond_v0 or request.use_downcasted_alpha_bar
        )

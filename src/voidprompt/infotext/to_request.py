"""An infotext's parameters as GenerationRequest fields: the one path from text to request.

:func:`request_fields_from_infotext` is what every front end calls (the HTTP API's ``infotext``
field, regenerating an image from its own text): it parses the text as A1111 does, with the
compatibility switches A1111 turns on for older versions already among the parsed keys
(:mod:`voidprompt.infotext.versions`), and converts each key to the request field's type.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from voidprompt.errors import InfotextError
from voidprompt.infotext.parse import parse_generation_parameters
from voidprompt.infotext.write import MASKED_CONTENT, eta_key
from voidprompt.sampling.registry import split_sampler_name

__all__ = ["request_fields_from_infotext", "request_fields_from_params"]


def _to_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise InfotextError(f"{key}: {value!r} is not a whole number")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not number.is_integer():
        raise InfotextError(f"{key}: {value!r} is not a whole number; fix the infotext value")
    return int(number)


def _to_float(key: str, value: Any) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise InfotextError(f"{key}: {value!r} is not a number; fix the infotext value") from None
    if not math.isfinite(number):
        raise InfotextError(f"{key}: {value!r} is not a finite number; fix the infotext value")
    return number


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise InfotextError(f"{key}: {value!r} is not True or False")


# infotext key -> (request field, converter)
_SIMPLE_FIELDS: dict[str, tuple[str, Any]] = {
    "Prompt": ("prompt", lambda k, v: str(v)),
    "Negative prompt": ("negative_prompt", lambda k, v: str(v)),
    "Steps": ("steps", _to_int),
    "CFG scale": ("cfg_scale", _to_float),
    "Seed": ("seed", _to_int),
    "Size-1": ("width", _to_int),
    "Size-2": ("height", _to_int),
    "Clip skip": ("clip_skip", _to_int),
    "ENSD": ("eta_noise_seed_delta", _to_int),
    "RNG": ("randn_source", lambda k, v: str(v)),
    "Variation seed": ("subseed", _to_int),
    "Variation seed strength": ("subseed_strength", _to_float),
    "Seed resize from-1": ("seed_resize_from_w", _to_int),
    "Seed resize from-2": ("seed_resize_from_h", _to_int),
    "Denoising strength": ("denoising_strength", _to_float),
    "Emphasis": ("emphasis", lambda k, v: str(v)),
    "Pad conds": ("pad_cond_uncond", _to_bool),
    "Pad conds v0": ("pad_cond_uncond_v0", _to_bool),
    "Old prompt editing timelines": ("use_old_scheduling", _to_bool),
    "Downcast alphas_cumprod": ("use_downcasted_alpha_bar", _to_bool),
    "Noise Schedule": ("sd_noise_schedule", lambda k, v: str(v)),
    "Refiner": ("refiner_checkpoint", lambda k, v: str(v)),
    "Refiner switch at": ("refiner_switch_at", _to_float),
    "Hires refiner": ("hires_fix_refiner_pass", lambda k, v: str(v)),
    "Refiner switch by sampling steps": ("refiner_switch_by_sample_steps", _to_bool),
    "Sigma churn": ("s_churn", _to_float),
    "Sigma tmin": ("s_tmin", _to_float),
    "Sigma tmax": ("s_tmax", _to_float),
    "Sigma noise": ("s_noise", _to_float),
    "NGMS": ("s_min_uncond", _to_float),
    "Tiling": ("tiling", _to_bool),
    "Discard penultimate sigma": ("always_discard_next_to_last_sigma", _to_bool),
    "SGM noise multiplier": ("sgm_noise_multiplier", _to_bool),
    "Beta schedule alpha": ("beta_dist_alpha", _to_float),
    "Beta schedule beta": ("beta_dist_beta", _to_float),
    "Hires steps": ("hr_second_pass_steps", _to_int),
    "Hires upscaler": ("hr_upscaler", lambda k, v: str(v)),
    "Hires prompt": ("hr_prompt", lambda k, v: str(v)),
    "Hires negative prompt": ("hr_negative_prompt", lambda k, v: str(v)),
    "Noise multiplier": ("initial_noise_multiplier", _to_float),
    "Conditional mask weight": ("inpainting_mask_weight", _to_float),
    "Masked area padding": ("inpaint_full_res_padding", _to_int),
}


def request_fields_from_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Map a parsed infotext (:func:`parse_generation_parameters`) onto GenerationRequest fields.

    Values are converted to the request's types; a bad value raises InfotextError naming the key.
    Keys that are not request fields (Model, Model hash, VAE, Version, Lora hashes, ...) are left to
    the caller. A parse default of 0 for the schedule overrides means "the model's own" (None).
    """
    fields: dict[str, Any] = {}
    for key, (name, convert) in _SIMPLE_FIELDS.items():
        if key in params and params[key] is not None:
            fields[name] = convert(key, params[key])

    if "Sampler" in params:
        # A schedule named in a pre-1.9 sampler name ("DPM++ 2M Karras") wins over "Schedule type".
        sampler, suffix = split_sampler_name(str(params["Sampler"]))
        fields["sampler_name"] = sampler
        fields["scheduler"] = suffix if suffix is not None else str(params.get("Schedule type", "Automatic"))
    elif "Schedule type" in params:
        fields["scheduler"] = str(params["Schedule type"])

    for key, name in (
        ("Schedule min sigma", "sigma_min"),
        ("Schedule max sigma", "sigma_max"),
        ("Schedule rho", "rho"),
    ):
        if key in params:
            value = _to_float(key, params[key])
            fields[name] = None if value == 0 else value

    eta_name = eta_key(fields.get("sampler_name", ""))
    if eta_name is not None and eta_name in params:
        fields["eta"] = _to_float(eta_name, params[eta_name])

    # Hires fix: present when the infotext carries an upscale factor, a resize or an upscaler.
    hr_resize = (
        _to_int("Hires resize-1", params.get("Hires resize-1", 0)),
        _to_int("Hires resize-2", params.get("Hires resize-2", 0)),
    )
    if "Hires upscale" in params or "Hires upscaler" in params or any(hr_resize):
        fields["enable_hr"] = True
        if "Hires upscale" in params:
            fields["hr_scale"] = _to_float("Hires upscale", params["Hires upscale"])
        fields["hr_resize_x"], fields["hr_resize_y"] = hr_resize
    hr_sampler = params.get("Hires sampler")
    if hr_sampler and hr_sampler != "Use same sampler":
        fields["hr_sampler_name"] = str(hr_sampler)
    hr_scheduler = params.get("Hires schedule type")
    if hr_scheduler and hr_scheduler != "Use same scheduler":
        fields["hr_scheduler"] = str(hr_scheduler)

    if params.get("Styles array"):
        fields["styles"] = tuple(str(name) for name in params["Styles array"])
    if "Mask blur" in params:
        fields["mask_blur_x"] = fields["mask_blur_y"] = _to_int("Mask blur", params["Mask blur"])
    if "Mask mode" in params:
        fields["inpainting_mask_invert"] = params["Mask mode"] == "Inpaint not masked"
    if "Masked content" in params:
        content = str(params["Masked content"])
        if content not in MASKED_CONTENT:
            raise InfotextError(f"Masked content: {content!r} is not one of {', '.join(MASKED_CONTENT)}")
        fields["inpainting_fill"] = MASKED_CONTENT.index(content)
    if "Inpaint area" in params:
        fields["inpaint_full_res"] = params["Inpaint area"] == "Only masked"
    return fields


def request_fields_from_infotext(text: str) -> dict[str, Any]:
    """The GenerationRequest fields an infotext sets, as A1111 reads them to regenerate its image.

    Keys that are no request field (Model, Model hash, VAE, Lora hashes, ...) are left out; a bad
    value raises InfotextError naming the key.
    """
    return request_fields_from_params(parse_generation_parameters(text))

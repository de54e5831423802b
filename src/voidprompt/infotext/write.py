"""Write A1111 infotext: one image's generation parameters and the text they make.

The text has three parts (A1111 ``processing.create_infotext`` / ``infotext_utils``):

* the prompt, possibly several lines;
* ``Negative prompt: ...`` (several lines allowed), only when the negative prompt is non-empty;
* one last line of ``Key: value`` pairs joined by ``", "``.

Behaviour was read from A1111 (AGPL) and re-implemented here; no code or regex is copied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voidprompt.errors import InfotextError
from voidprompt.infotext.versions import DEFAULT_VERSION, check_written_version
from voidprompt.request import GenerationRequest

__all__ = [
    "KEY_ORDER",
    "TRAILING_KEYS",
    "ImageFacts",
    "ModelFacts",
    "RunFacts",
    "create_infotext",
    "format_params_line",
    "generation_params",
    "quote",
]

# The fixed head of A1111 1.10's parameter line (processing.create_infotext); everything else
# follows in insertion order, then TRAILING_KEYS.
KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

# Samplers whose eta is A1111's "Eta DDIM" setting rather than the ancestral "Eta".
ETA_DDIM_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})
# "Masked content" values, indexed by the request's inpainting_fill.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

# --------------------------------------------------------------------------------------------------
# Quoting


def quote(value: Any, *, quote_quotes: bool = False) -> Any:
    """Return ``value`` JSON-quoted when A1111 would quote it, else unchanged.

    A1111 quotes iff ``str(value)`` contains ``,``, a newline or ``:``.

    # A1111 quirk: a value containing ``"`` but none of those is written bare, so a bare value that
    # both starts and ends with ``"`` is JSON-decoded on reading (``"x"`` comes back as ``x``).
    # ``quote_quotes=True`` also quotes values that contain ``"`` - still readable by A1111, and
    # lossless.
    """
    text = str(value)
    if "," in text or "\n" in text or ":" in text or (quote_quotes and '"' in text):
        # json.dumps of the object itself, as A1111 does (a list becomes a JSON array).
        return json.dumps(value, ensure_ascii=False)
    return value


# --------------------------------------------------------------------------------------------------
# Writing


def _ordered_items(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    head = [(key, params[key]) for key in KEY_ORDER if key in params]
    fixed = set(KEY_ORDER) | set(TRAILING_KEYS)
    middle = [(key, value) for key, value in params.items() if key not in fixed]
    tail = [(key, params[key]) for key in TRAILING_KEYS if key in params]
    return head + middle + tail


def format_params_line(params: Mapping[str, Any], *, quote_quotes: bool = False) -> str:
    """The ``Key: value, ...`` line: A1111 order, None omitted, values quoted as A1111 quotes them."""
    pieces = []
    for key, value in _ordered_items(params):
        if value is None:
            continue
        if "\n" in key or ", " in key or ": " in key:
            raise InfotextError(f"infotext key {key!r} contains a separator; keys must be one plain phrase")
        # A1111 quirk: a pair whose value equals its key is written as the bare key (extensions use
        # it for flags). The reader ignores bare words, so such a flag does not read back.
        if key == value:
            pieces.append(key)
        else:
            pieces.append(f"{key}: {quote(value, quote_quotes=quote_quotes)}")
    return ", ".join(pieces)


def create_infotext(
    prompt: str,
    negative_prompt: str,
    params: Mapping[str, Any],
    *,
    quote_quotes: bool = False,
) -> str:
    """A1111's infotext for one image.

    ``params`` may be in any order: the keys A1111 places first (:data:`KEY_ORDER`) come first, the
    others keep their insertion order, and ``Version`` / ``User`` come last. None values are omitted.
    """
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    # A1111 quirk: the whole text is stripped, so leading/trailing whitespace of the prompt is lost.
    return f"{prompt}{negative}\n{format_params_line(params, quote_quotes=quote_quotes)}".strip()


def _compact_number(value: float) -> float | int:
    # A1111's UI hands integral slider values over as ints ("CFG scale: 7"); keep that look.
    return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class ImageFacts:
    """One image's own values: its seed and variation seed (A1111's ``all_seeds[index]`` and
    ``all_subseeds[index]``) and the hash of the picture it started from, if any."""

    seed: int
    subseed: int
    init_image_hash: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    """The weights that drew the image, as the infotext names them (short hashes, names)."""

    hash: str | None = None
    name: str | None = None
    vae_name: str | None = None
    vae_hash: str | None = None
    # An inpainting checkpoint reads the mask as conditioning; only then is its weight written.
    inpainting: bool = False


@dataclass(frozen=True)
class RunFacts:
    """What the run resolved for the request beyond the request itself.

    ``schedule_type`` is the schedule the sampler actually used (A1111 writes the resolved label,
    e.g. "Karras" for DPM++ 2M on Automatic); without it ``request.scheduler`` is written, which
    A1111 resolves to the same schedule. ``uses_ensd`` is the sampler's say (A1111
    ``is_sampler_using_eta_noise_seed_delta``: the sampler draws eta noise and the effective eta is
    not 0); ENSD is written only then and only when non-zero. ``extra`` follows
    ``request.extra_generation_params`` (e.g. "Lora hashes", "TI hashes").
    """

    schedule_type: str | None = None
    hires_schedule_type: str | None = None
    uses_ensd: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


_UNNAMED_MODEL = ModelFacts()
_NOTHING_RESOLVED = RunFacts()


def generation_params(
    request: GenerationRequest,
    image: ImageFacts,
    model: ModelFacts = _UNNAMED_MODEL,
    run: RunFacts = _NOTHING_RESOLVED,
    *,
    version: str | None = DEFAULT_VERSION,
) -> dict[str, Any]:
    """A1111's generation parameters for ONE image of ``request``, in A1111's order.

    ``version`` is the "Version" written (None: none); one that A1111 would read as an older
    release of its own is refused (:func:`voidprompt.infotext.versions.check_written_version`).
    """
    check_written_version(version)
    r = request
    params: dict[str, Any] = {
        "Steps": r.steps,
        "Sampler": r.sampler_name,
        "Schedule type": run.schedule_type or r.scheduler,
        "CFG scale": _compact_number(r.cfg_scale),
        "Seed": image.seed,
        "Size": f"{r.width}x{r.height}",
        "Model hash": model.hash,
        "Model": model.name,
        "VAE hash": model.vae_hash,
        "VAE": model.vae_name,
        "Variation seed": image.subseed if r.subseed_strength != 0 else None,
        "Variation seed strength": r.subseed_strength if r.subseed_strength != 0 else None,
        "Seed resize from": (
            f"{r.seed_resize_from_w}x{r.seed_resize_from_h}"
            if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0
            else None
        ),
        # txt2img writes it only with hires fix; img2img always.
        "Denoising strength": r.denoising_strength if (r.is_img2img or r.enable_hr) else None,
        "Conditional mask weight": r.inpainting_mask_weight if model.inpainting else None,
        "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
        "ENSD": r.eta_noise_seed_delta if run.uses_ensd and r.eta_noise_seed_delta != 0 else None,
        "Init image hash": image.init_image_hash,
        "RNG": r.randn_source if r.randn_source != "GPU" else None,
        "Tiling": True if r.tiling else None,
    }

    # Extra parameters, in the order A1111's pipeline inserts them during a run.
    if r.enable_hr and not r.is_img2img:
        if r.hr_sampler_name and r.hr_sampler_name != r.sampler_name:
            params["Hires sampler"] = r.hr_sampler_name
        if r.hr_prompt and r.hr_prompt != r.prompt:
            params["Hires prompt"] = r.hr_prompt
        if r.hr_negative_prompt and r.hr_negative_prompt != r.negative_prompt:
            params["Hires negative prompt"] = r.hr_negative_prompt
        hr_sched = run.hires_schedule_type or r.hr_scheduler
        if hr_sched and hr_sched != params["Schedule type"]:
            params["Hires schedule type"] = hr_sched
        if r.hr_resize_x == 0 and r.hr_resize_y == 0:
            params["Hires upscale"] = _compact_number(r.hr_scale)
        else:
            params["Hires resize"] = f"{r.hr_resize_x}x{r.hr_resize_y}"
        if r.hr_second_pass_steps:
            params["Hires steps"] = r.hr_second_pass_steps
        params["Hires upscaler"] = r.hr_upscaler
    if r.is_img2img and r.mask is not None:
        if r.mask_blur_x == r.mask_blur_y and r.mask_blur_x > 0:
            params["Mask blur"] = r.mask_blur_x
        if r.inpainting_mask_invert:
            params["Mask mode"] = "Inpaint not masked"
        if r.inpainting_fill != 1:
            params["Masked content"] = MASKED_CONTENT[r.inpainting_fill]
        if r.inpaint_full_res:
            params["Inpaint area"] = "Only masked"
            params["Masked area padding"] = r.inpaint_full_res_padding
    if r.is_img2img and r.initial_noise_multiplier != 1.0:
        params["Noise multiplier"] = r.initial_noise_multiplier
    if r.use_old_scheduling:
        params["Old prompt editing timelines"] = True
    if r.emphasis != "Original" and any(c in text for text in (r.prompt, r.negative_prompt) for c in "(["):
        params["Emphasis"] = r.emphasis
    if r.use_downcasted_alpha_bar:
        params["Downcast alphas_cumprod"] = True
    if r.sd_noise_schedule != "Default":
        params["Noise Schedule"] = r.sd_noise_schedule
    if r.sigma_min is not None:
        params["Schedule min sigma"] = r.sigma_min
    if r.sigma_max is not None:
        params["Schedule max sigma"] = r.sigma_max
    if r.rho is not None:
        params["Schedule rho"] = r.rho
    if r.eta is not None:
        # A1111 writes eta only when it differs from the sampler family's default.
        if r.sampler_name in ETA_DDIM_SAMPLERS:
            if r.eta != 0.0:
                params["Eta DDIM"] = r.eta
        elif r.eta != 1.0:
            params["Eta"] = r.eta
    if r.s_churn != 0.0:
        params["Sigma churn"] = r.s_churn
    if r.s_tmin != 0.0:
        params["Sigma tmin"] = r.s_tmin
    if r.s_tmax is not None:
        params["Sigma tmax"] = r.s_tmax
    if r.s_noise != 1.0:
        params["Sigma noise"] = r.s_noise
    if r.always_discard_next_to_last_sigma:
        params["Discard penultimate sigma"] = True
    if r.sgm_noise_multiplier:
        params["SGM noise multiplier"] = True
    if r.s_min_uncond != 0.0:
        params["NGMS"] = r.s_min_uncond
    if r.pad_cond_uncond:
        params["Pad conds"] = True
    if r.pad_cond_uncond_v0:
        params["Pad conds v0"] = True
    for source in (r.extra_generation_params, run.extra):
        for key, value in source.items():
            params[key] = value  # an existing key keeps its place, as in A1111
    params["Version"] = version
    return {key: value for key, value in params.items() if value is not None}

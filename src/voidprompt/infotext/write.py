"""Write A1111 infotext: one image's generation parameters and the text they make.

The text has three parts (A1111 ``processing.create_infotext`` / ``infotext_utils``):

* the prompt, possibly several lines;
* ``Negative prompt: ...`` (several lines allowed), only when the negative prompt is non-empty;
* one last line of ``Key: value`` pairs joined by ``", "``.

Behaviour was read from A1111 (AGPL) and re-implemented here; no code or regex is copied.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from voidprompt.errors import InfotextError, InvalidRequestError
from voidprompt.infotext.versions import DEFAULT_VERSION, check_written_version
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import SamplerSpec, SchedulerSpec, get_sampler, resolve, schedule_infotext

__all__ = [
    "KEY_ORDER",
    "TRAILING_KEYS",
    "ImageFacts",
    "ModelFacts",
    "PassFacts",
    "RunFacts",
    "create_infotext",
    "emphasis_written",
    "eta_key",
    "format_params_line",
    "generation_params",
    "quote",
    "ti_hashes_text",
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
class PassFacts:
    """One sampler pass as it ran, and what it recorded only because it happened.

    ``sampler`` / ``scheduler`` are the pass's resolved specs; ``from_image`` is True when it starts
    part-way down a schedule (img2img, the hires pass: A1111's ``sample_img2img``, which never
    applies the SGM noise multiplier). ``ngms`` is True when NGMS skipped the uncond pass on some
    call; ``padded_conds`` / ``padded_conds_v0`` when "Pad conds" (v0) padded the pass's last call
    (A1111's ``add_infotext`` reads its denoiser's flags once, after sampling).
    ``old_timelines_differ`` is read for the hires pass only: A1111 computes its conditioning just
    before it samples, so "Old prompt editing timelines" lands there when only the hires schedules
    change (the first pass's is :attr:`RunFacts.old_timelines_differ`)."""

    sampler: SamplerSpec
    scheduler: SchedulerSpec
    from_image: bool = False
    ngms: bool = False
    padded_conds: bool = False
    padded_conds_v0: bool = False
    old_timelines_differ: bool = False


@dataclass(frozen=True)
class RunFacts:
    """What the run resolved for the request beyond the request itself.

    ``schedule_type`` is the schedule the sampler actually used (A1111 writes the resolved label,
    e.g. "Karras" for DPM++ 2M on Automatic); without it ``request.scheduler`` is written, which
    A1111 resolves to the same schedule. ``uses_ensd`` is the sampler's say (A1111
    ``is_sampler_using_eta_noise_seed_delta``: the sampler draws eta noise and the effective eta is
    not 0); ENSD is written only then and only when non-zero.

    The rest say what happened, for the keys A1111 writes only then; None means the writer was not
    told, and it falls back to the request's settings (each setting read as if it took effect):

    * ``passes``: the first pass, then the hires pass if any (:class:`PassFacts`);
    * ``model_sigma_range``: the model's (sigma_min, sigma_max); schedule overrides equal to it are
      not written;
    * ``encoded_texts``: every text the text encoder read (prompt-editing steps resolved,
      extra-network tags removed, styles applied, AND split), the basis of "Emphasis";
    * ``old_timelines_differ``: whether "Old prompt editing timelines" changed any schedule of the
      first pass's conditioning;
    * ``prompts`` / ``hires_prompts``: the first and the hires pass's (prompt, negative prompt) as
      the infotext shows them (styled); the hires ones are written when they differ.

    ``networks`` are the extra networks' keys ("Lora hashes", ...), recorded when the networks are
    activated; ``ti_hashes`` is the "TI hashes" value; ``extra`` follows
    ``request.extra_generation_params`` (refiner facts and the like).
    """

    schedule_type: str | None = None
    uses_ensd: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)
    passes: tuple[PassFacts, ...] | None = None
    model_sigma_range: tuple[float, float] | None = None
    encoded_texts: tuple[str, ...] | None = None
    old_timelines_differ: bool | None = None
    prompts: tuple[str, str] | None = None
    hires_prompts: tuple[str, str] | None = None
    networks: Mapping[str, Any] = field(default_factory=dict)
    ti_hashes: str | None = None


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

    # Extra parameters, in the order A1111's pipeline inserts them during a run: the processing's
    # init (hires fix, inpainting), then per batch the extra networks, the conditioning, the
    # alphas_cumprod overrides and the sampler passes.
    hr_pass = r.enable_hr and not r.is_img2img
    if hr_pass:
        if r.hr_sampler_name and r.hr_sampler_name != r.sampler_name:
            params["Hires sampler"] = r.hr_sampler_name
        if run.hires_prompts is not None and run.prompts is not None:
            # A1111 compares the styled hires prompts with the image's styled prompts.
            (hr_prompt, hr_negative), (prompt, negative) = run.hires_prompts, run.prompts
            params["Hires prompt"] = hr_prompt if hr_prompt != prompt else None
            params["Hires negative prompt"] = hr_negative if hr_negative != negative else None
        else:
            if r.hr_prompt and r.hr_prompt != r.prompt:
                params["Hires prompt"] = r.hr_prompt
            if r.hr_negative_prompt and r.hr_negative_prompt != r.negative_prompt:
                params["Hires negative prompt"] = r.hr_negative_prompt
        # A1111 reserves the key's place here; the hires pass's get_sigmas fills it in.
        params["Hires schedule type"] = None
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
    params.update(run.networks)
    old_timelines = run.old_timelines_differ if run.old_timelines_differ is not None else True
    if r.use_old_scheduling and old_timelines:
        params["Old prompt editing timelines"] = True
    if run.ti_hashes is not None:
        params["TI hashes"] = run.ti_hashes
    texts = run.encoded_texts if run.encoded_texts is not None else (r.prompt, r.negative_prompt)
    if emphasis_written(r.emphasis, texts):
        params["Emphasis"] = r.emphasis
    if r.use_downcasted_alpha_bar:
        params["Downcast alphas_cumprod"] = True
    if r.sd_noise_schedule != "Default":
        params["Noise Schedule"] = r.sd_noise_schedule
    passes = run.passes if run.passes is not None else _passes_from_request(r)
    first_schedule: str | None = None
    for index, facts in enumerate(passes):
        hires = index > 0
        _add_pass_params(params, r, facts, run.model_sigma_range, hires=hires, first_schedule=first_schedule)
        if not hires:
            first_schedule = _schedule_keys(r, facts, run.model_sigma_range).get("Schedule type")
    for source in (r.extra_generation_params, run.extra):
        for key, value in source.items():
            params[key] = value  # an existing key keeps its place, as in A1111
    params["Version"] = version
    return {key: value for key, value in params.items() if value is not None}


def emphasis_written(emphasis: str, texts: Sequence[str]) -> bool:
    """A1111 1.10 writes "Emphasis" when the mode is not "Original" and some text the encoder read
    holds a ``(`` or ``[`` (its CLIP wrapper decides on the texts after prompt editing, tag removal
    and styles, whether or not the brackets weigh anything)."""
    return emphasis != "Original" and any("(" in text or "[" in text for text in texts)


def ti_hashes_text(calls: Sequence[Mapping[str, str]]) -> str | None:
    """The "TI hashes" value A1111 1.10 builds from its text encoder calls, ``calls`` in the order
    they ran, each ``{embedding name: short hash}`` in the order that call met them.

    Each call that used an embedding with a hash puts its ``name: hash`` items in front of the value
    so far, so the last call comes first and a name used by two calls is written twice. Colons and
    commas are taken out of names. None when no call used a hashed embedding."""
    value = ""
    for used in calls:
        items = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in used.items() if h]
        if items:
            value = ", ".join([*items, value]) if value else ", ".join(items)
    return value or None


def eta_key(sampler_name: str) -> str | None:
    """The infotext key of a sampler's eta: "Eta DDIM" for the DDIM family (A1111's eta_ddim
    setting), "Eta" for the ancestral samplers (eta_ancestral) and for a sampler voidprompt does not
    know, None for a sampler without eta."""
    try:
        kind = get_sampler(sampler_name).eta_kind
    except InvalidRequestError:
        return "Eta"
    return {"ddim": "Eta DDIM", "ancestral": "Eta"}.get(kind or "")


def _passes_from_request(r: GenerationRequest) -> tuple[PassFacts, ...]:
    # Without the engine's report every setting is read as having taken effect.
    def facts(sampler_name: str, scheduler: str | None, from_image: bool) -> PassFacts:
        sampler, schedule = resolve(sampler_name, scheduler)
        return PassFacts(
            sampler,
            schedule,
            from_image=from_image,
            ngms=r.s_min_uncond > 0,
            padded_conds=r.pad_cond_uncond,
            padded_conds_v0=r.pad_cond_uncond_v0,
        )

    passes = [facts(r.sampler_name, r.scheduler, r.is_img2img)]
    if r.enable_hr and not r.is_img2img:
        passes.append(facts(r.hr_sampler_name or r.sampler_name, r.hr_scheduler or r.scheduler, True))
    return tuple(passes)


def _schedule_keys(
    r: GenerationRequest, facts: PassFacts, model_range: tuple[float, float] | None
) -> dict[str, Any]:
    return schedule_infotext(
        facts.sampler,
        facts.scheduler,
        model_range,
        sigma_min=r.sigma_min,
        sigma_max=r.sigma_max,
        rho=r.rho,
        beta_alpha=r.beta_dist_alpha,
        beta_beta=r.beta_dist_beta,
    )


def _add_pass_params(
    params: dict[str, Any],
    r: GenerationRequest,
    facts: PassFacts,
    model_range: tuple[float, float] | None,
    *,
    hires: bool,
    first_schedule: str | None,
) -> None:
    """One sampler pass's keys in A1111 1.10's order: for the hires pass its conditioning's record
    (Old prompt editing timelines), then its ``get_sigmas`` (penultimate sigma, the schedule and its
    overrides), the SGM noise multiplier (txt2img's first pass), its
    ``initialize`` (eta, churn), what its denoiser did (NGMS) and its ``add_infotext`` (Pad conds).
    A key the first pass wrote keeps its place when the hires pass writes it again."""
    sampler = facts.sampler
    if hires and r.use_old_scheduling and facts.old_timelines_differ:
        params["Old prompt editing timelines"] = True
    if r.always_discard_next_to_last_sigma and not sampler.discard_next_to_last_sigma:
        params["Discard penultimate sigma"] = True
    schedule = _schedule_keys(r, facts, model_range)
    label = schedule.pop("Schedule type", None)
    # A1111 compares with the first pass's recorded schedule, which exists only when a schedule
    # function ran there.
    if hires and label is not None and label != first_schedule:
        params["Hires schedule type"] = label
    params.update(schedule)
    if r.sgm_noise_multiplier and not sampler.is_timestep_sampler and not facts.from_image:
        params["SGM noise multiplier"] = True
    key = eta_key(sampler.label)
    if r.eta is not None and key is not None and r.eta != sampler.default_eta:
        params[key] = r.eta
    # A1111 writes a churn setting only where it hands it to the sampler and it differs from the
    # sampler's default (an s_tmax of None stands for A1111's infinity).
    if r.s_churn != 0.0 and sampler.takes("s_churn"):
        params["Sigma churn"] = r.s_churn
    if r.s_tmin != 0.0 and sampler.takes("s_tmin"):
        params["Sigma tmin"] = r.s_tmin
    if r.s_tmax is not None and sampler.takes("s_tmax"):
        params["Sigma tmax"] = r.s_tmax
    if r.s_noise != 1.0 and sampler.takes("s_noise"):
        params["Sigma noise"] = r.s_noise
    if facts.ngms:
        params["NGMS"] = r.s_min_uncond
    if facts.padded_conds:
        params["Pad conds"] = True
    if facts.padded_conds_v0:
        params["Pad conds v0"] = True

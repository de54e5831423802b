"""A1111 infotext ("parameters" text): write it, read it, and map it onto a GenerationRequest.

The text has three parts (A1111 ``processing.create_infotext`` / ``infotext_utils``):

* the prompt, possibly several lines;
* ``Negative prompt: ...`` (several lines allowed), only when the negative prompt is non-empty;
* one last line of ``Key: value`` pairs joined by ``", "``.

Reading follows A1111's ``parse_generation_parameters``: values stay the strings found in the text
(``"20"``, ``"7.0"``, ``"512"``) except JSON-quoted ones, which are decoded; the defaults A1111 fills in
keep A1111's own types (``"Clip skip": "1"`` is a string, ``"Masked area padding": 32`` an int,
``"Refiner switch by sampling steps": False`` a bool). Typed values for a request come from
:func:`request_fields_from_params`.

Behaviour was read from A1111 (AGPL) and re-implemented here; no code or regex is copied.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from voidprompt import __version__
from voidprompt.errors import InfotextError, PromptError

if TYPE_CHECKING:
    from voidprompt.request import GenerationRequest

__all__ = [
    "DEFAULT_VERSION",
    "KEY_ORDER",
    "TRAILING_KEYS",
    "backcompat_flags",
    "create_infotext",
    "format_params_line",
    "generation_params",
    "infotext_version",
    "parse_generation_parameters",
    "prompt_uses_emphasis",
    "quote",
    "request_fields_from_params",
    "split_sampler_scheduler",
    "unquote",
]

# What we write as "Version". It must not parse as a PEP 440 version: A1111 turns on its
# backward-compatibility switches for any parseable version below its own thresholds.
DEFAULT_VERSION = f"voidprompt-{__version__}"

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

# A1111's scheduler labels (modules/sd_schedulers.py), used to split legacy sampler names such as
# "DPM++ 2M Karras" into sampler + schedule. Longest first so "SGM Uniform" wins over "Uniform".
_SCHEDULER_LABELS: tuple[str, ...] = (
    "Align Your Steps",
    "Polyexponential",
    "SGM Uniform",
    "KL Optimal",
    "Exponential",
    "Automatic",
    "Uniform",
    "Karras",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
)
# Samplers whose eta is A1111's "Eta DDIM" setting rather than the ancestral "Eta".
_TIMESTEP_SAMPLERS = frozenset({"DDIM", "DDIM CFG++", "PLMS", "UniPC"})

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


def unquote(text: str) -> str:
    """JSON-decode ``text`` when it is wrapped in double quotes; leave it as is when that fails."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        decoded = json.loads(text)
    except ValueError:
        return text
    # A quoted JSON string is the only thing the pair grammar lets through.
    return decoded if isinstance(decoded, str) else text


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


def _validate_version(version: str | None) -> None:
    if version is None:
        return
    parsed = infotext_version(version)
    if parsed is not None and parsed < _V180_HR_STYLES:
        raise InfotextError(
            f"Version {version!r} reads as version {'.'.join(map(str, parsed[0]))}, which turns on "
            f"A1111's backward-compatibility switches for this image; write a non-numeric version such as "
            f"{DEFAULT_VERSION!r}"
        )


def generation_params(
    request: GenerationRequest,
    *,
    seed: int,
    subseed: int,
    model_hash: str | None,
    model_name: str | None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    schedule_type: str | None = None,
    hires_schedule_type: str | None = None,
    uses_ensd: bool = False,
    uses_inpainting_conditioning: bool = False,
    init_image_hash: str | None = None,
    version: str | None = DEFAULT_VERSION,
    user: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A1111's generation parameters for ONE image of ``request``, in A1111's order.

    ``seed`` / ``subseed`` are this image's own (A1111's ``all_seeds[index]``). ``schedule_type`` is the
    schedule the sampler actually used (A1111 writes the resolved label, e.g. "Karras" for DPM++ 2M on
    Automatic); without it ``request.scheduler`` is written, which A1111 resolves to the same schedule.
    ``uses_ensd`` is the sampler's say (A1111 ``is_sampler_using_eta_noise_seed_delta``: the sampler
    draws eta noise and the effective eta is not 0); ENSD is written only then and only when non-zero.
    ``extra`` is appended after ``request.extra_generation_params`` (e.g. "Lora hashes").
    """
    _validate_version(version)
    r = request
    params: dict[str, Any] = {
        "Steps": r.steps,
        "Sampler": r.sampler_name,
        "Schedule type": schedule_type or r.scheduler,
        "CFG scale": _compact_number(r.cfg_scale),
        "Seed": seed,
        "Size": f"{r.width}x{r.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": subseed if r.subseed_strength != 0 else None,
        "Variation seed strength": r.subseed_strength if r.subseed_strength != 0 else None,
        "Seed resize from": (
            f"{r.seed_resize_from_w}x{r.seed_resize_from_h}"
            if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0
            else None
        ),
        # txt2img writes it only with hires fix; img2img always.
        "Denoising strength": r.denoising_strength if (r.is_img2img or r.enable_hr) else None,
        "Conditional mask weight": r.inpainting_mask_weight if uses_inpainting_conditioning else None,
        "Clip skip": r.clip_skip if r.clip_skip > 1 else None,
        "ENSD": r.eta_noise_seed_delta if uses_ensd and r.eta_noise_seed_delta != 0 else None,
        "Init image hash": init_image_hash,
        "RNG": r.randn_source if r.randn_source != "GPU" else None,
    }

    # Extra parameters, in the order A1111's pipeline inserts them during a run.
    if r.enable_hr and not r.is_img2img:
        if r.hr_sampler_name and r.hr_sampler_name != r.sampler_name:
            params["Hires sampler"] = r.hr_sampler_name
        if r.hr_prompt and r.hr_prompt != r.prompt:
            params["Hires prompt"] = r.hr_prompt
        if r.hr_negative_prompt and r.hr_negative_prompt != r.negative_prompt:
            params["Hires negative prompt"] = r.hr_negative_prompt
        hr_sched = hires_schedule_type or r.hr_scheduler
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
            params["Masked content"] = _MASKED_CONTENT[r.inpainting_fill]
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
    if r.sigma_min is not None:
        params["Schedule min sigma"] = r.sigma_min
    if r.sigma_max is not None:
        params["Schedule max sigma"] = r.sigma_max
    if r.rho is not None:
        params["Schedule rho"] = r.rho
    if r.eta is not None:
        # A1111 writes eta only when it differs from the sampler family's default.
        if r.sampler_name in _TIMESTEP_SAMPLERS:
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
    for source in (r.extra_generation_params, extra or {}):
        for key, value in source.items():
            params[key] = value  # an existing key keeps its place, as in A1111
    params["Version"] = version
    params["User"] = user
    return {key: value for key, value in params.items() if value is not None}


# --------------------------------------------------------------------------------------------------
# Reading

# One ``Key: value`` pair of the parameter line. Grammar (A1111 ``re_param``): optional white space;
# a key of at least two characters starting with a word character and continuing with word
# characters, spaces, hyphens or slashes; a colon; optional white space; then either a double-quoted
# JSON string (at least one character, backslash escapes) or anything up to the next comma; then a
# comma or the end of the line.
_PAIR = re.compile(
    r"""\s*
    (?P<key>\w[\w /-]+)
    :\s*
    (?P<value>"(?:[^"\\]|\\.)+"|[^,]*)
    (?:,|$)""",
    re.VERBOSE,
)
_WXH = re.compile(r"(\d+)x(\d+)")


def _pairs(line: str) -> list[tuple[str, str]]:
    return [(m.group("key"), m.group("value")) for m in _PAIR.finditer(line)]


def parse_generation_parameters(
    text: str,
    *,
    use_old_hires_fix_width_height: bool = False,
    skip_fields: Iterable[str] = (),
) -> dict[str, Any]:
    """Parse an infotext into A1111's dict (``Prompt``, ``Negative prompt``, every key, defaults).

    ``WxH`` values become ``Key-1`` (W) / ``Key-2`` (H). Styles are not extracted (voidprompt keeps no
    style database at this layer). ``use_old_hires_fix_width_height`` is A1111's compatibility setting
    of that name. Version-based compatibility flags are added as A1111 does (see
    :func:`backcompat_flags`).
    """
    res: dict[str, Any] = {}
    *lines, last = text.strip().split("\n")
    # The last line is the parameter line only if it holds at least three pairs.
    if len(_pairs(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    negative_prompt = "\n".join(negative_lines)

    for key, value in _pairs(last):
        # A1111 quirk: an empty unquoted value still counts; a value that merely starts and ends
        # with '"' is decoded even if it was written bare.
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        # A1111 quirk: the size pattern is anchored with Python's "$", so "512x512\n" would match;
        # values come from one line, so only an exact "WxH" matches here.
        size = _WXH.fullmatch(value)
        if size is not None:
            res[f"{key}-1"] = size.group(1)
            res[f"{key}-2"] = size.group(2)
        else:
            res[key] = value

    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    _fill_defaults(res, use_old_hires_fix_width_height=use_old_hires_fix_width_height)
    if "Emphasis" not in res and (prompt_uses_emphasis(prompt) or prompt_uses_emphasis(negative_prompt)):
        res["Emphasis"] = "Original"
    res.setdefault("Refiner switch by sampling steps", False)
    res.update(backcompat_flags(res))
    for key in skip_fields:
        res.pop(key, None)
    return res


def _fill_defaults(res: dict[str, Any], *, use_old_hires_fix_width_height: bool) -> None:
    # Missing keys mean A1111's defaults were in effect when the image was made.
    res.setdefault("Clip skip", "1")
    hypernet = res.get("Hypernet")
    if hypernet is not None:
        # Legacy "Hypernet: name, Hypernet strength: x" becomes the modern prompt tag.
        res["Prompt"] += f"<hypernet:{hypernet}:{res.get('Hypernet strength', '1.0')}>"
    if "Hires resize-1" not in res:
        res["Hires resize-1"] = 0
        res["Hires resize-2"] = 0
    res.setdefault("Hires sampler", "Use same sampler")
    res.setdefault("Hires schedule type", "Use same scheduler")
    res.setdefault("Hires checkpoint", "Use same checkpoint")
    res.setdefault("Hires prompt", "")
    res.setdefault("Hires negative prompt", "")
    res.setdefault("Mask mode", "Inpaint masked")
    res.setdefault("Masked content", "original")
    res.setdefault("Inpaint area", "Whole picture")
    res.setdefault("Masked area padding", 32)
    _restore_old_hires_fix(res, use_old_hires_fix_width_height)
    res.setdefault("RNG", "GPU")
    res.setdefault("Schedule type", "Automatic")
    res.setdefault("Schedule max sigma", 0)
    res.setdefault("Schedule min sigma", 0)
    res.setdefault("Schedule rho", 0)
    res.setdefault("VAE Encoder", "Full")
    res.setdefault("VAE Decoder", "Full")
    res.setdefault("FP8 weight", "Disable")
    if "Cache FP16 weight for LoRA" not in res and res["FP8 weight"] != "Disable":
        res["Cache FP16 weight for LoRA"] = False


def old_hires_fix_first_pass_dimensions(width: int, height: int) -> tuple[int, int]:
    """A1111's pre-1.0 automatic first-pass size: about 512x512 pixels, rounded up to multiples of 64."""
    scale = math.sqrt(512 * 512 / (width * height))
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


def _restore_old_hires_fix(res: dict[str, Any], use_old_width_height: bool) -> None:
    # Old hires infotexts stored "First pass size" (0x0 = automatic) with Size being the final size;
    # today Size is the first pass and "Hires resize" the final size.
    if use_old_width_height:
        hires_w, hires_h = int(res.get("Hires resize-1", 0)), int(res.get("Hires resize-2", 0))
        if hires_w and hires_h:
            res["Size-1"], res["Size-2"] = hires_w, hires_h
            return
    first_w, first_h = res.get("First pass size-1"), res.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    fw, fh = int(first_w), int(first_h)
    width, height = int(res.get("Size-1", 512)), int(res.get("Size-2", 512))
    if fw == 0 or fh == 0:
        fw, fh = old_hires_fix_first_pass_dimensions(width, height)
    res["Size-1"], res["Size-2"] = fw, fh
    res["Hires resize-1"], res["Hires resize-2"] = width, height


# --------------------------------------------------------------------------------------------------
# Emphasis detection


def prompt_uses_emphasis(prompt: str) -> bool:
    """True when A1111's emphasis parser gives some text a weight other than exactly 1.0.

    This is the 1.10 rule for filling ``Emphasis: Original`` on reading. Weights are multiplied in
    A1111's order and compared exactly, so ``[(x)]`` (1.1 * (1/1.1) == 1.0) is plain while
    ``[[[(((x)))]]]`` (1.0000000000000002) counts as emphasis.
    """
    # Imported here: the prompts package pulls in torch and the text encoder code, which reading an
    # infotext does not otherwise need.
    from voidprompt.prompts.parse import is_break, parse_prompt_attention

    try:
        segments = parse_prompt_attention(prompt)
    except PromptError:
        # A1111 quirk: "(x:1.2.3)" raises inside A1111's parser; reading an infotext treats it as plain.
        return False
    return any(weight != 1.0 for text, weight in segments if not is_break((text, weight)))


# --------------------------------------------------------------------------------------------------
# Versions and backward compatibility (A1111 infotext_versions)

# A comparable PEP 440 reading: (release without trailing zeros, pre-release key, post number).
# Pre-release key: dev (-4, n) < a (-3, n) < b (-2, n) < rc (-1, n) < final (0, 0); post: -1 = none.
VersionKey = tuple[tuple[int, ...], tuple[int, int], int]

_PEP440 = re.compile(
    r"""v?
    (?P<release>\d+(?:\.\d+)*)
    (?:[-_.]?(?P<pre_l>alpha|a|beta|b|rc|c|preview|pre)[-_.]?(?P<pre_n>\d+)?)?
    (?:-(?P<post_implicit>\d+)|[-_.]?(?:post|rev|r)[-_.]?(?P<post_n>\d*))?
    (?:[-_.]?dev[-_.]?(?P<dev_n>\d*))?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_PHASE = {"a": -3, "alpha": -3, "b": -2, "beta": -2, "c": -1, "rc": -1, "pre": -1, "preview": -1}


def _version_key(release: tuple[int, ...], pre: tuple[int, int] = (0, 0), post: int = -1) -> VersionKey:
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    return (release, pre, post)


def infotext_version(text: str | None) -> VersionKey | None:
    """A1111's reading of a "Version" value as a comparable key, or None when A1111 cannot parse it.

    A1111 keeps only the first two dash-separated parts of ``v1.7.0-225-gabc1234`` ("v1.7.0-225",
    i.e. 1.7.0 post 225) and then asks ``packaging`` for a PEP 440 version; anything else (our
    ``voidprompt-0.1.0``, forge's ``f2.0.1v1.10.1-previous-...``) is None. A dev marker after a
    pre-release is not ordered finer than the pre-release itself; no A1111 threshold needs it.
    """
    if text is None:
        return None
    text = str(text).strip()
    parts = text.split("-")
    if len(parts) > 2:
        text = f"{parts[0]}-{parts[1]}"
    m = _PEP440.fullmatch(text)
    if m is None:
        return None
    release = tuple(int(p) for p in m.group("release").split("."))
    pre = (0, 0)
    if m.group("pre_l"):
        pre = (_PRE_PHASE[m.group("pre_l").lower()], int(m.group("pre_n") or 0))
    elif m.group("dev_n") is not None:
        pre = (-4, int(m.group("dev_n") or 0))
    post = -1
    if m.group("post_implicit") is not None:
        post = int(m.group("post_implicit"))
    elif m.group("post_n") is not None:
        post = int(m.group("post_n") or 0)
    return _version_key(release, pre, post)


_V160 = _version_key((1, 6, 0))
_V170_TSNR = _version_key((1, 7, 0), post=225)
_V180 = _version_key((1, 8, 0))
_V180_HR_STYLES = _version_key((1, 8, 0), post=139)


def backcompat_flags(params: Mapping[str, Any]) -> dict[str, bool]:
    """The compatibility switches A1111 turns on for an infotext's "Version" (none if unparseable).

    * before 1.6.0: "Old prompt editing timelines" when the prompt has ``[``; "Pad conds v0" for
      DDIM / PLMS;
    * before v1.7.0-225: "Downcast alphas_cumprod";
    * before 1.8.0 with a Refiner: "Refiner switch by sampling steps".
    """
    version = infotext_version(params.get("Version"))
    flags: dict[str, bool] = {}
    if version is None:
        return flags
    if version < _V160 and "[" in str(params.get("Prompt", "")):
        flags["Old prompt editing timelines"] = True
    if version < _V160 and params.get("Sampler", "") in ("DDIM", "PLMS"):
        flags["Pad conds v0"] = True
    if version < _V170_TSNR:
        flags["Downcast alphas_cumprod"] = True
    if version < _V180 and params.get("Refiner"):
        flags["Refiner switch by sampling steps"] = True
    return flags


# --------------------------------------------------------------------------------------------------
# Infotext -> GenerationRequest fields


def split_sampler_scheduler(sampler: str, scheduler: str = "Automatic") -> tuple[str, str]:
    """Split a pre-1.9 sampler name with a schedule suffix ("DPM++ 2M Karras") into its two parts.

    A later suffix overrides ``scheduler`` as in A1111 ``get_sampler_and_scheduler``. Reverting a
    scheduler that equals the sampler's default to "Automatic" is left to the sampling registry: both
    give the same sigmas.
    """
    for label in _SCHEDULER_LABELS:
        for spelling in (label, label.lower().replace(" ", "_")):
            if sampler.endswith(" " + spelling) and len(sampler) > len(spelling) + 1:
                return sampler[: -(len(spelling) + 1)], label
    return sampler, scheduler


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
        return float(str(value).strip())
    except ValueError:
        raise InfotextError(f"{key}: {value!r} is not a number; fix the infotext value") from None


def _to_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise InfotextError(f"{key}: {value!r} is not True or False")


_MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")

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
    "Sigma churn": ("s_churn", _to_float),
    "Sigma tmin": ("s_tmin", _to_float),
    "Sigma tmax": ("s_tmax", _to_float),
    "Sigma noise": ("s_noise", _to_float),
    "NGMS": ("s_min_uncond", _to_float),
    "Discard penultimate sigma": ("always_discard_next_to_last_sigma", _to_bool),
    "SGM noise multiplier": ("sgm_noise_multiplier", _to_bool),
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
        scheduler = str(params.get("Schedule type", "Automatic"))
        sampler, scheduler = split_sampler_scheduler(str(params["Sampler"]), scheduler)
        fields["sampler_name"], fields["scheduler"] = sampler, scheduler
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

    sampler_name = fields.get("sampler_name", "")
    if sampler_name in _TIMESTEP_SAMPLERS and "Eta DDIM" in params:
        fields["eta"] = _to_float("Eta DDIM", params["Eta DDIM"])
    elif sampler_name not in _TIMESTEP_SAMPLERS and "Eta" in params:
        fields["eta"] = _to_float("Eta", params["Eta"])

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

    if "Mask blur" in params:
        fields["mask_blur_x"] = fields["mask_blur_y"] = _to_int("Mask blur", params["Mask blur"])
    if "Mask mode" in params:
        fields["inpainting_mask_invert"] = params["Mask mode"] == "Inpaint not masked"
    if "Masked content" in params:
        content = str(params["Masked content"])
        if content not in _MASKED_CONTENT:
            raise InfotextError(f"Masked content: {content!r} is not one of {', '.join(_MASKED_CONTENT)}")
        fields["inpainting_fill"] = _MASKED_CONTENT.index(content)
    if "Inpaint area" in params:
        fields["inpaint_full_res"] = params["Inpaint area"] == "Only masked"
    return fields

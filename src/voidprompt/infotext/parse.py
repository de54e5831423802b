"""Read A1111 infotext: the prompt, the negative prompt and the ``Key: value`` line, with defaults.

Reading follows A1111's ``parse_generation_parameters``: values stay the strings found in the text
(``"20"``, ``"7.0"``, ``"512"``) except JSON-quoted ones, which are decoded; the defaults A1111 fills in
keep A1111's own types (``"Clip skip": "1"`` is a string, ``"Masked area padding": 32`` an int,
``"Refiner switch by sampling steps": False`` a bool). Typed values for a request come from
:mod:`voidprompt.infotext.to_request`.

Behaviour was read from A1111 (AGPL) and re-implemented here; no code or regex is copied.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from voidprompt.errors import InfotextError, InvalidRequestError, PromptError
from voidprompt.infotext.versions import backcompat_flags
from voidprompt.prompts.parse import is_break, parse_prompt_attention
from voidprompt.prompts.styles import StyleDatabase
from voidprompt.request import MAX_PROMPT_CHARS, check_prompt_chars

__all__ = [
    "MAX_INFOTEXT_CHARS",
    "old_hires_fix_first_pass_dimensions",
    "parse_generation_parameters",
    "prompt_uses_emphasis",
    "unquote",
]

# The longest infotext read, checked before any parsing. A request's infotext holds its prompt pair
# (MAX_PROMPT_CHARS together, as written), the hires pair JSON-quoted (escaped quotes, backslashes
# and newlines double at most) and the parameter line with its network hashes.
MAX_INFOTEXT_CHARS = 4 * MAX_PROMPT_CHARS


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
# From a failed start: the white space and the run of key characters the key would have spanned.
_KEY_RUN = re.compile(r"\s*\w[\w /-]*")


def _pairs(line: str) -> list[tuple[str, str]]:
    """The pairs ``_PAIR.finditer`` finds, in time linear in the line's length.

    finditer retries a failed match one character later, and each try scans the whole run of key
    characters again: quadratic on a long line without a colon (a 20,000-character prompt took
    seconds). A try fails only when the run of key characters after its white space is one character
    long or does not end in a colon (the value part always matches), and every later start inside
    that run sees the same run end, so the next start worth trying is the run's end.
    """
    pairs = []
    pos, end = 0, len(line)
    while pos < end:
        match = _PAIR.match(line, pos)
        if match is not None:
            pairs.append((match.group("key"), match.group("value")))
            pos = match.end()
            continue
        run = _KEY_RUN.match(line, pos)
        pos = max(pos + 1, run.end()) if run is not None else pos + 1
    return pairs


def parse_generation_parameters(
    text: str,
    *,
    use_old_hires_fix_width_height: bool = False,
    skip_fields: Iterable[str] = (),
    style_db: StyleDatabase | None = None,
) -> dict[str, Any]:
    """Parse an infotext into A1111's dict (``Prompt``, ``Negative prompt``, every key, defaults).

    ``WxH`` values become ``Key-1`` (W) / ``Key-2`` (H). With ``style_db``, styles are taken back out
    of the prompts into ``Styles array`` as A1111 1.8+ does under its default ``infotext_styles``
    setting ("Apply if any": the key is set only when a style was found).
    ``use_old_hires_fix_width_height`` is A1111's compatibility setting of that name. Version-based
    compatibility flags are added as A1111 does (see
    :func:`voidprompt.infotext.versions.backcompat_flags`).
    """
    if len(text) > MAX_INFOTEXT_CHARS:
        raise InfotextError(
            f"the infotext is {len(text)} characters, over the limit of {MAX_INFOTEXT_CHARS} "
            f"(prompts are limited to {MAX_PROMPT_CHARS} characters); shorten its prompts"
        )
    res: dict[str, Any] = {}
    *lines, last = text.strip().split("\n")
    # The last line is the parameter line only if it holds at least three pairs.
    if len(_pairs(last)) < 3:
        lines.append(last)
        last = ""

    prompt = negative_prompt = ""
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        # A1111 quirk: a line joins with "\n" only once the text so far is non-empty, so empty
        # lines before any text vanish (a negative prompt written with a leading newline reads
        # back without it).
        if in_negative:
            negative_prompt = f"{negative_prompt}\n{line}" if negative_prompt else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    try:
        # Before the emphasis parser reads them: the same limit as a prompt sent any other way.
        check_prompt_chars(prompt, negative_prompt)
    except InvalidRequestError as error:
        raise InfotextError(f"the infotext's {error}") from None

    for key, value in _pairs(last):
        if not value:
            # A1111 quirk: its reader fails on an empty value ("Refiner: ,") and skips the pair,
            # so the key reads as absent (and takes its default).
            continue
        # A1111 quirk: a value that merely starts and ends with '"' is decoded even if it was
        # written bare.
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

    if style_db is not None:
        found, prompt, negative_prompt = style_db.extract_styles_from_prompt(prompt, negative_prompt)
        if found:
            res["Styles array"] = found
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
    try:
        segments = parse_prompt_attention(prompt)
    except PromptError:
        # A1111 quirk: "(x:1.2.3)" raises inside A1111's parser; reading an infotext treats it as plain.
        return False
    return any(weight != 1.0 for text, weight in segments if not is_break((text, weight)))

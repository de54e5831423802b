"""NovelAI's prompt dialect, and the study's helpers for weighted tag lists.

NovelAI emphasis: ``{x}`` multiplies by 1.05 and ``[x]`` divides by 1.05, nesting multiplies, and
there are no ``(x:w)`` weights and no escapes. It is an explicit mode: an A1111 prompt is never read
this way unless asked. ``nai_to_a1111`` rewrites such a prompt for A1111's parser.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Final

from voidprompt.errors import PromptError

__all__ = [
    "NAI_MULTIPLIER",
    "NOVELAI_NEGATIVE",
    "format_weight",
    "nai_to_a1111",
    "parse_nai_attention",
    "weight_tags",
]

NAI_MULTIPLIER: Final[float] = 1.05

# The study's negative prompt: "the most general you can find in the internet" (NovelAI's default list).
NOVELAI_NEGATIVE: Final[str] = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, "
    "artist name"
)


def parse_nai_attention(text: str) -> list[tuple[str, float]]:
    """Split NovelAI-dialect text into (text, weight) segments, adjacent equal weights merged.

    The weight of a character is ``1.05 ** (curly depth - square depth)``, computed once per depth
    pair so that ``{[x]}`` is exactly 1.0. A ``}`` or ``]`` with nothing open is literal text; a bracket
    left open applies to the end of the text (as A1111 treats its own unclosed brackets). Parentheses
    are ordinary text in this dialect.
    """
    segments: list[tuple[str, float]] = []
    stack: list[str] = []
    buf: list[str] = []

    def weight() -> float:
        return NAI_MULTIPLIER ** (stack.count("{") - stack.count("["))

    def flush() -> None:
        if buf:
            w = weight()
            piece = "".join(buf)
            buf.clear()
            if segments and segments[-1][1] == w:
                segments[-1] = (segments[-1][0] + piece, w)
            else:
                segments.append((piece, w))

    closer_of = {"{": "}", "[": "]"}
    for c in text:
        if c in "{[":
            flush()
            stack.append(c)
        elif c in "}]" and c in (closer_of[o] for o in stack):
            flush()
            # Close the innermost bracket of this kind; a mismatched one in between stays open.
            opener = "{" if c == "}" else "["
            del stack[len(stack) - 1 - stack[::-1].index(opener)]
        else:
            buf.append(c)
    flush()
    return segments or [("", 1.0)]


def _escape_a1111(text: str) -> str:
    """Make text literal for A1111's emphasis parser (backslash first, then the brackets)."""
    for c in "\\()[]":
        text = text.replace(c, "\\" + c)
    return text


def format_weight(w: float, decimals: int = 4) -> str:
    """A weight rounded to ``decimals`` places, without trailing zeros: 0.952380... -> "0.9524"."""
    if not math.isfinite(w):
        raise PromptError(f"a prompt weight must be a finite number, got {w!r}")
    text = f"{round(w, decimals):.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def nai_to_a1111(text: str, decimals: int = 4) -> str:
    """Rewrite NovelAI-dialect text as A1111 text with explicit ``(text:weight)`` groups.

    ``"a {b} [c]"`` -> ``"a (b:1.05) (c:0.9524)"``. Literal ``( ) [ ] \\`` in the NovelAI text are
    escaped so A1111 reads them as characters. A weight that rounds to 1 is written as plain text.
    """
    out: list[str] = []
    for piece, w in parse_nai_attention(text):
        if not piece:
            continue
        literal = _escape_a1111(piece)
        label = format_weight(w, decimals)
        out.append(literal if label == "1" else f"({literal}:{label})")
    return "".join(out)


def _js_number(w: float) -> str:
    """``String(w)`` in JavaScript: shortest round-trip digits, no ".0" on integers.

    The study's ``node step`` script printed weights this way, so 0.9 -> "0.9", 1.0 -> "1",
    1.05 -> "1.05", 0.1 + 0.2 -> "0.30000000000000004".
    """
    if not math.isfinite(w):
        raise PromptError(f"a tag weight must be a finite number, got {w!r}")
    if w == 0:
        return "0"
    if 1e-6 <= abs(w) < 1e21:
        return format(Decimal(repr(w)).normalize(), "f")
    mantissa, _, exponent = repr(w).partition("e")
    mantissa = mantissa.removesuffix(".0")
    exp = int(exponent)
    return f"{mantissa}e{'+' if exp > 0 else '-'}{abs(exp)}"


def weight_tags(tag_list: str, w: float) -> str:
    """The study's ``step``: weight every comma-separated tag by ``w``.

    ``weight_tags("lowres, bad anatomy", 0.9)`` -> ``"(lowres:0.9), (bad anatomy:0.9)"``. Tags are
    stripped and empty ones dropped; the weight is written as JavaScript would (``1.0`` -> ``"1"``).
    """
    label = _js_number(w)
    tags = [tag.strip() for tag in tag_list.split(",")]
    return ", ".join(f"({tag}:{label})" for tag in tags if tag)

"""A1111's emphasis language (``(x)``, ``[x]``, ``(x:w)``, escapes, ``BREAK``), ``#`` comments and ``AND``.

This is the parser the CLIP encoder runs on every scheduled text. It is a hand-written
scanner that accepts the same token language as A1111's ``parse_prompt_attention`` and applies the
same arithmetic, in the same order, so weights are bit-identical - including float noise such as
``1.1 * 1.1 * 1.3 == 1.5730000000000004``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from voidprompt.errors import PromptError

__all__ = [
    "BREAK_WEIGHT",
    "ROUND_MULTIPLIER",
    "SQUARE_MULTIPLIER",
    "MultiCondPrompt",
    "is_break",
    "multicond_prompt",
    "parse_prompt_attention",
    "split_and",
    "strip_comments",
]

ROUND_MULTIPLIER: Final[float] = 1.1
SQUARE_MULTIPLIER: Final[float] = 1 / 1.1
# The encoder recognises a chunk break by the pair ("BREAK", -1.0); anything else is text.
BREAK_WEIGHT: Final[float] = -1.0

# BREAK must stand as a word of its own; surrounding whitespace is swallowed with it.
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")

# Characters that end a run of plain text in the emphasis language.
_SPECIAL = frozenset("\\()[]:")


def is_break(segment: tuple[str, float]) -> bool:
    """True for the marker that closes a 75-token chunk.

    # A1111 quirk: a BREAK inside brackets gets its -1 multiplied (e.g. -1.1) and is then
    # encoded as the literal word "BREAK" with that negative weight.
    """
    return segment[0] == "BREAK" and segment[1] == BREAK_WEIGHT


def _match_weight_close(text: str, pos: int) -> tuple[int, str] | None:
    """Match ``:`` ws* ``[+-]?[.digits]+`` ws* ``)`` at ``pos``; return (end, number text).

    Whitespace and digits use Python's Unicode notions (``str.isspace`` / ``str.isdecimal``), which are
    what a ``re`` pattern's ``\\s`` and ``\\d`` mean, so the accepted language is the same as A1111's.
    """
    n = len(text)
    if pos >= n or text[pos] != ":":
        return None
    i = pos + 1
    while i < n and text[i].isspace():
        i += 1
    start = i
    if i < n and text[i] in "+-":
        i += 1
    digits_start = i
    while i < n and (text[i] == "." or text[i].isdecimal()):
        i += 1
    if i == digits_start:
        return None
    number = text[start:i]
    while i < n and text[i].isspace():
        i += 1
    if i < n and text[i] == ")":
        return i + 1, number
    return None


def _tokens(text: str) -> list[tuple[str, str | None]]:
    """Split ``text`` into (token, weight-number-or-None) in A1111's order of alternatives."""
    out: list[tuple[str, str | None]] = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c == "\\":
            # An escape takes the next character only if it is one of ( ) [ ] \ ; otherwise the
            # backslash stands alone (and later turns into an empty string).
            if i + 1 < n and text[i + 1] in "()[]\\":
                out.append((text[i : i + 2], None))
                i += 2
            else:
                out.append(("\\", None))
                i += 1
        elif c in "([)]":
            out.append((c, None))
            i += 1
        elif c == ":":
            close = _match_weight_close(text, i)
            if close is not None:
                end, number = close
                out.append((text[i:end], number))
                i = end
            else:
                out.append((":", None))
                i += 1
        else:
            j = i + 1
            while j < n and text[j] not in _SPECIAL:
                j += 1
            out.append((text[i:j], None))
            i = j
    return out


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Parse A1111 emphasis syntax into (text, weight) segments.

    ``BREAK`` appears as ``("BREAK", -1.0)``; an empty prompt gives ``[("", 1.0)]``; adjacent segments
    of exactly equal weight are merged.

    Raises PromptError for a weight A1111 also cannot read, such as ``(a:1.2.3)``.
    """
    texts: list[str] = []
    weights: list[float] = []
    round_stack: list[int] = []
    square_stack: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        # In place and in closing order: the float rounding must match A1111's exactly.
        for p in range(start, len(weights)):
            weights[p] *= multiplier

    for token, number in _tokens(text):
        if token.startswith("\\"):
            texts.append(token[1:])
            weights.append(1.0)
        elif token == "(":
            round_stack.append(len(texts))
        elif token == "[":
            square_stack.append(len(texts))
        elif number is not None and round_stack:
            try:
                weight = float(number)
            except ValueError:
                # A1111 crashes here as well (float() of e.g. "1.2.3"); say what to fix instead.
                raise PromptError(
                    f"cannot read the emphasis weight {number!r} in {token!r}; "
                    "write a single number such as (word:1.2)"
                ) from None
            multiply_range(round_stack.pop(), weight)
        elif token == ")" and round_stack:
            multiply_range(round_stack.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_stack:
            multiply_range(square_stack.pop(), SQUARE_MULTIPLIER)
        else:
            for k, part in enumerate(_BREAK_SPLIT.split(token)):
                if k > 0:
                    texts.append("BREAK")
                    weights.append(BREAK_WEIGHT)
                texts.append(part)
                weights.append(1.0)

    # A1111 quirk: unclosed brackets are closed at the end, in the order they were opened
    # (all round ones first, then all square ones).
    for pos in round_stack:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_stack:
        multiply_range(pos, SQUARE_MULTIPLIER)

    if not texts:
        return [("", 1.0)]

    merged: list[tuple[str, float]] = []
    for seg_text, w in zip(texts, weights, strict=True):
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + seg_text, w)
        else:
            merged.append((seg_text, w))
    return merged


# --- comments --------------------------------------------------------------------------------------


def _strip_whole_line_comments(text: str) -> str:
    """First pass of A1111's comment stripping: lines that start with ``#``.

    Scanning left to right, a ``#`` at the very start of the text, or right after a newline, starts a
    match that runs to the end of its line and takes that line's newline (if any) and the newline
    before it (if any); each match becomes a single newline, so the commented line disappears.

    # A1111 quirk: the trailing newline a match consumes cannot start the next match, so of two
    # consecutive comment lines only the first is removed here; the second pass then leaves an empty
    # line in its place.
    """
    out: list[str] = []
    n = len(text)
    i = 0
    while i < n:
        if i == 0 and text[0] == "#":
            hash_at = 0
        elif text[i] == "\n" and i + 1 < n and text[i + 1] == "#":
            hash_at = i + 1
        else:
            out.append(text[i])
            i += 1
            continue
        eol = text.find("\n", hash_at)
        i = n if eol < 0 else eol + 1
        out.append("\n")
    return "".join(out)


def _strip_inline_comments(text: str) -> str:
    """Second pass: every remaining ``#`` up to and including its end of line becomes a newline."""
    out: list[str] = []
    n = len(text)
    i = 0
    while i < n:
        if text[i] == "#":
            eol = text.find("\n", i)
            i = n if eol < 0 else eol + 1
            out.append("\n")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def strip_comments(text: str) -> str:
    """A1111's prompt comments (option "Enable comments", on by default): drop ``#`` to end of line.

    A line that is only a comment disappears with its newline; a comment after text leaves the text
    and a newline (which CLIP later reads as whitespace).
    """
    return _strip_inline_comments(_strip_whole_line_comments(text))


# --- AND (composable diffusion) ----------------------------------------------------------------------

_AND_SPLIT = re.compile(r"\bAND\b")
# A weight suffix: ":" then [+-] then "5", "5.", "5.25" or ".25", at the very end (after rstrip).
_AND_WEIGHT_TAIL = re.compile(r":\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\Z")


def _split_weight(subprompt: str) -> tuple[str, float]:
    """Text and composable-diffusion weight of one AND part.

    The text keeps its leading whitespace and loses its trailing whitespace; with a ``:number`` suffix
    the text is what precedes it (whitespace before the colon dropped). Default weight 1.0.
    """
    body = subprompt.rstrip()
    m = _AND_WEIGHT_TAIL.search(body)
    if m is None:
        return body, 1.0
    return body[: m.start()].rstrip(), float(m.group(1))


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split a positive prompt on the word ``AND`` into (sub-prompt, weight) pairs, in order.

    ``"a cat :1.2 AND a dog"`` -> ``[("a cat", 1.2), (" a dog", 1.0)]``. Duplicates are kept: every
    part adds its own term to CFG, even when its text repeats another part's.
    """
    return [_split_weight(part) for part in _AND_SPLIT.split(prompt)]


@dataclass(frozen=True)
class MultiCondPrompt:
    """A positive prompt as A1111's ``get_multicond_prompt_list`` sees it.

    ``texts`` holds each distinct sub-prompt text once (first-seen order): A1111 encodes a repeated
    text only once. ``parts`` lists every AND part in order as (index into ``texts``, weight); weights
    are never merged, so ``"a AND a"`` gives two parts sharing index 0.
    """

    texts: tuple[str, ...]
    parts: tuple[tuple[int, float], ...]


def multicond_prompt(prompt: str) -> MultiCondPrompt:
    texts: list[str] = []
    index_of: dict[str, int] = {}
    parts: list[tuple[int, float]] = []
    for text, weight in split_and(prompt):
        index = index_of.get(text)
        if index is None:
            index = index_of[text] = len(texts)
            texts.append(text)
        parts.append((index, weight))
    return MultiCondPrompt(tuple(texts), tuple(parts))

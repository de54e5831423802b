"""A1111 prompt styles (``styles.csv``): named prompt / negative-prompt templates.

A style's text either contains ``{prompt}``, which is replaced by the user's prompt, or is appended
to it after ``", "`` (``modules/styles.py: merge_prompts``). Styles apply in the order given, each to
the result of the previous one.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from voidprompt.errors import PromptError

__all__ = [
    "PromptStyle",
    "StyleDatabase",
    "apply_styles",
    "extract_styles",
    "merge_prompts",
]

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """Combine one style's text with a prompt, as A1111 does.

    With ``{prompt}`` in the style, every occurrence is replaced by the prompt, untouched. Otherwise
    both are stripped and the non-empty ones are joined with ``", "`` (prompt first), so an empty
    prompt gives just the style and an empty style just the stripped prompt.
    """
    if PLACEHOLDER in style_prompt:
        return style_prompt.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, style_prompts: Iterable[str]) -> str:
    for style_prompt in style_prompts:
        prompt = merge_prompts(style_prompt, prompt)
    return prompt


# A1111 collapses runs of spaces before matching a style's text against a prompt.
_SPACES = re.compile("  +")


def _extract_style_text(style_text: str, prompt: str) -> str | None:
    """The prompt with one style's text taken back out, or None when the style does not match."""
    prompt = _SPACES.sub(" ", prompt.strip())
    style_text = _SPACES.sub(" ", style_text.strip())
    if PLACEHOLDER in style_text:
        # A1111 splits at the first placeholder only (a maxsplit of 2 that fails on a third one).
        parts = style_text.split(PLACEHOLDER)
        if len(parts) != 2:
            return None
        left, right = parts
        if prompt.startswith(left) and prompt.endswith(right):
            return prompt[len(left) : len(prompt) - len(right)]
        return None
    if not prompt.endswith(style_text):
        return None
    rest = prompt[: len(prompt) - len(style_text)]
    return rest[:-2] if rest.endswith(", ") else rest


def extract_styles(
    styles: Iterable[PromptStyle], prompt: str, negative_prompt: str
) -> tuple[list[str], str, str]:
    """A1111 1.8+'s reading of styles back out of an infotext's prompts ("Styles array").

    Repeatedly takes the first style (in database order) whose prompt and negative prompt both match
    the current texts, removes it, and continues with the rest; a style with neither text never
    matches. Returns the names in the order they were applied (the reverse of extraction) and the
    prompts with the styles removed.
    """
    candidates = [s for s in styles if s.prompt or s.negative_prompt]
    found: list[str] = []
    while True:
        for style in candidates:
            positive = _extract_style_text(style.prompt, prompt)
            negative = _extract_style_text(style.negative_prompt, negative_prompt)
            if positive is not None and negative is not None:
                prompt, negative_prompt = positive, negative
                candidates.remove(style)
                found.append(style.name)
                break
        else:
            return found[::-1], prompt, negative_prompt


class StyleDatabase:
    """Styles by name, normally read from an A1111 ``styles.csv``.

    ``ignore_unknown`` is A1111's own rule (its HTTP API and UI): an unknown name counts as an empty
    style, which still strips the prompt (``merge_prompts`` with an empty style); aiyabot sends
    ``["None"]`` on every request. Without it an unknown name is an error, because a study that names
    a missing style has a typo.
    """

    def __init__(self, styles: Iterable[PromptStyle] = (), *, ignore_unknown: bool = False) -> None:
        self._styles: dict[str, PromptStyle] = {}
        self.ignore_unknown = ignore_unknown
        for style in styles:
            self._styles[style.name] = style

    @classmethod
    def from_csv_files(cls, paths: Iterable[str | Path], *, ignore_unknown: bool = False) -> StyleDatabase:
        """Several ``styles.csv`` files in order (A1111's repeated ``--styles-file``); a later file's
        style replaces an earlier one of the same name."""
        styles: list[PromptStyle] = []
        for path in paths:
            styles.extend(cls.from_csv(path).styles)
        return cls(styles, ignore_unknown=ignore_unknown)

    @classmethod
    def from_csv(cls, path: str | Path) -> StyleDatabase:
        """Read ``name,prompt,negative_prompt`` rows (A1111's format; the old ``name,text`` also works).

        Rows whose name is empty or starts with ``#`` are skipped; a later row with the same name
        replaces an earlier one, as in A1111.
        """
        path = Path(path)
        try:
            # utf-8-sig: A1111 writes and reads the file with a BOM-tolerant codec.
            with path.open(encoding="utf-8-sig", newline="") as f:
                rows = list(csv.DictReader(f, skipinitialspace=True))
        except OSError as e:
            raise PromptError(f"cannot read the styles file {str(path)!r}: {e}") from e
        except csv.Error as e:
            raise PromptError(f"the styles file {str(path)!r} is not valid CSV: {e}") from e

        styles: list[PromptStyle] = []
        for row in rows:
            name = _cell(row, "name")
            if not name or name.startswith("#"):
                continue
            prompt = _cell(row, "prompt") if "prompt" in row else _cell(row, "text")
            styles.append(PromptStyle(name, prompt, _cell(row, "negative_prompt")))
        return cls(styles)

    @property
    def names(self) -> list[str]:
        return list(self._styles)

    @property
    def styles(self) -> list[PromptStyle]:
        return list(self._styles.values())

    def __contains__(self, name: object) -> bool:
        return name in self._styles

    def __len__(self) -> int:
        return len(self._styles)

    def get(self, name: str) -> PromptStyle:
        try:
            return self._styles[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self._styles) or "none (the database is empty)"
            # A1111 silently ignores an unknown style; a study that names one has a typo, so say so.
            raise PromptError(f"unknown style {name!r}; known styles: {known}") from None

    def _lookup(self, name: str) -> PromptStyle:
        if self.ignore_unknown and name not in self._styles:
            return PromptStyle(name)
        return self.get(name)

    def apply_styles_to_prompt(self, prompt: str, styles: Iterable[str]) -> str:
        return apply_styles(prompt, [self._lookup(name).prompt for name in styles])

    def apply_negative_styles_to_prompt(self, prompt: str, styles: Iterable[str]) -> str:
        return apply_styles(prompt, [self._lookup(name).negative_prompt for name in styles])

    def extract_styles_from_prompt(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        return extract_styles(self._styles.values(), prompt, negative_prompt)


def _cell(row: Mapping[str | None, object], key: str) -> str:
    # csv.DictReader gives None for missing trailing cells; treat them as empty text.
    value = row.get(key)
    return value if isinstance(value, str) else ""

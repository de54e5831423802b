"""A1111 prompt styles (``styles.csv``): named prompt / negative-prompt templates.

A style's text either contains ``{prompt}``, which is replaced by the user's prompt, or is appended
to it after ``", "`` (``modules/styles.py: merge_prompts``). Styles apply in the order given, each to
the result of the previous one.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from voidprompt.errors import PromptError

__all__ = [
    "PromptStyle",
    "StyleDatabase",
    "apply_styles",
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


class StyleDatabase:
    """Styles by name, normally read from an A1111 ``styles.csv``."""

    def __init__(self, styles: Iterable[PromptStyle] = ()) -> None:
        self._styles: dict[str, PromptStyle] = {}
        for style in styles:
            self._styles[style.name] = style

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

    def apply_styles_to_prompt(self, prompt: str, styles: Iterable[str]) -> str:
        return apply_styles(prompt, [self.get(name).prompt for name in styles])

    def apply_negative_styles_to_prompt(self, prompt: str, styles: Iterable[str]) -> str:
        return apply_styles(prompt, [self.get(name).negative_prompt for name in styles])


def _cell(row: Mapping[str | None, object], key: str) -> str:
    # csv.DictReader gives None for missing trailing cells; treat them as empty text.
    value = row.get(key)
    return value if isinstance(value, str) else ""

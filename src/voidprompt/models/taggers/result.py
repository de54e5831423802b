"""What a tagger reads off one picture, and how tags are written as a caption."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from voidprompt.errors import ModelLoadError

__all__ = ["KAOMOJIS", "TagResult", "TaggerError", "escape_tag", "format_tag"]

# A1111's deepbooru_escape: a backslash and round brackets get a backslash, so a caption pasted into
# a prompt reads them literally instead of as emphasis.
_SPECIAL = re.compile(r"([\\()])")

# Emoticon tags whose underscore is part of the face: written as they are, never with a space.
KAOMOJIS = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
        "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip


class TaggerError(ModelLoadError):
    """A tagger's files are missing, damaged or of another shape than expected."""


def escape_tag(tag: str) -> str:
    return _SPECIAL.sub(r"\\\1", tag)


def format_tag(tag: str, *, use_spaces: bool = True, escape: bool = True) -> str:
    """A tag as a caption writes it: underscores to spaces (emoticons excepted), brackets escaped."""
    if use_spaces and tag not in KAOMOJIS:
        tag = tag.replace("_", " ")
    return escape_tag(tag) if escape else tag


@dataclass(frozen=True)
class TagResult:
    """The tags a tagger found, each with its probability, in the tagger's own spelling
    (Danbooru's, with underscores: ``no_humans``).

    ``general`` and ``character`` hold the tags above their thresholds; ``rating`` every rating tag
    with its probability, whatever it is, since a rating is read as a distribution.
    """

    general: Mapping[str, float] = field(default_factory=dict)
    character: Mapping[str, float] = field(default_factory=dict)
    rating: Mapping[str, float] = field(default_factory=dict)

    def tags(self) -> tuple[str, ...]:
        """Character then general tags, each group by falling probability (ties by name)."""
        return _by_probability(self.character) + _by_probability(self.general)

    def rating_tag(self) -> str | None:
        """The most probable rating, or None for a tagger that reports none."""
        return max(self.rating, key=lambda t: (self.rating[t], t)) if self.rating else None

    def caption(self, *, use_spaces: bool = True, escape: bool = True) -> str:
        return ", ".join(format_tag(t, use_spaces=use_spaces, escape=escape) for t in self.tags())


def _by_probability(probabilities: Mapping[str, float]) -> tuple[str, ...]:
    ordered: Iterable[str] = sorted(probabilities, key=lambda t: (-probabilities[t], t))
    return tuple(ordered)

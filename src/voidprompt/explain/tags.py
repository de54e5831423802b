"""Prompt tokens and tags as the attention maps see them.

A tag is a run of prompt tokens between commas that also stays inside one emphasis fragment: in
``lowres, (bad hands:1.2), blurry`` the tags are ``lowres``, ``bad hands`` (weight 1.2) and
``blurry``; in ``(red ball, blue cube:1.3)`` they are ``red ball`` and ``blue cube``. Commas belong to
no tag. Chunk rows map back to tokens through the chunker's ``sources``
(:class:`voidprompt.prompts.chunks.PromptChunk`); start, end and padding rows map to no token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from voidprompt.prompts.chunks import TokenizedLine


@dataclass(frozen=True)
class Tag:
    """One tag of a prompt text: its label, its emphasis weight and its tokens (indices into the
    line's ``pieces``)."""

    label: str
    weight: float
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class PromptTokens:
    """One prompt text's tokens and tags, and which context row holds which token."""

    texts: tuple[str, ...]
    weights: tuple[float, ...]
    tags: tuple[Tag, ...]
    # Per context row (77 per chunk): the token index, or -1 for start, end and padding rows.
    rows: tuple[int, ...]

    def row_index(self, length: int) -> torch.Tensor:
        """The token index of each of ``length`` context rows (rows past the text's own chunks, such
        as a batch's padding chunks or "Pad conds", hold no token)."""
        rows = list(self.rows[:length]) + [-1] * max(0, length - len(self.rows))
        return torch.tensor(rows, dtype=torch.long)


def prompt_tokens(line: TokenizedLine, comma_id: int) -> PromptTokens:
    """The tokens and tags of one tokenized prompt line."""
    pieces = line.pieces
    tags: list[Tag] = []
    current: list[int] = []

    def close() -> None:
        if current:
            label = "".join(pieces[i].text for i in current).strip()
            tags.append(Tag(label, pieces[current[0]].weight, tuple(current)))
            current.clear()

    for index, piece in enumerate(pieces):
        if piece.token == comma_id and piece.embedding is None:
            close()
            continue
        if current and pieces[current[-1]].fragment != piece.fragment:
            close()
        current.append(index)
    close()
    rows = tuple(source for chunk in line.chunks for source in chunk.sources)
    return PromptTokens(
        texts=tuple(p.text.strip() for p in pieces),
        weights=tuple(p.weight for p in pieces),
        tags=tuple(tags),
        rows=rows,
    )


PromptKey = tuple[bool, int, int]
"""(negative, AND sub-prompt, schedule entry): which prompt text a UNet row reads."""

PassPrompts = dict[PromptKey, PromptTokens]
"""Each prompt text's tokens, for one sampler pass."""


def pass_prompts(
    tokenize: Callable[[str], TokenizedLine],
    comma_id: int,
    positive: Sequence[tuple[Sequence[tuple[int, str]], float]],
    negative: Sequence[tuple[int, str]],
) -> PassPrompts:
    """The tokens of every schedule entry of a pass's prompts: ``positive`` its AND sub-prompts'
    schedules with their weights, ``negative`` the negative prompt's schedule (as
    :func:`voidprompt.prompts.prepare.prepare_prompts` gives them), tokenized by the encoder's own
    chunker."""
    prompts: PassPrompts = {}
    for part, (schedule, _) in enumerate(positive):
        for entry, (_, text) in enumerate(schedule):
            prompts[(False, part, entry)] = prompt_tokens(tokenize(text), comma_id)
    for entry, (_, text) in enumerate(negative):
        prompts[(True, 0, entry)] = prompt_tokens(tokenize(text), comma_id)
    return prompts

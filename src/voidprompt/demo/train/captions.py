"""Captions as the trainer feeds them: token ids, the Clip-skip-2 context the UNet learns from, and
the caption augmentations of the diffusion phase (tag shuffling and thinning, dropout for CFG, foreign
words, the blinded EOS run)."""

from __future__ import annotations

import torch
from torch import nn

from voidprompt.demo.train.modules import text_model
from voidprompt.models.tokenizer import load_clip_tokenizer

__all__ = ["CLIP_SKIP", "CONTEXT", "CaptionBatcher", "blind_padding", "encode_tokens", "text_condition"]

CONTEXT = 77
CLIP_SKIP = 2  # the layer the UNet is trained on: hidden_states[-2]


def text_condition(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The UNet's context exactly as A1111 computes it at Clip skip 2 (all weights 1): the penultimate
    hidden state through the final LayerNorm."""
    positions = torch.arange(ids.shape[1], dtype=torch.long, device=ids.device).expand(ids.shape[0], -1)
    out = text_encoder(input_ids=ids, position_ids=positions, output_hidden_states=True)
    final_layer_norm: nn.Module = getattr(text_model(text_encoder), "final_layer_norm")  # noqa: B009
    return final_layer_norm(out.hidden_states[-CLIP_SKIP])


def encode_tokens(tag_tokens: list[list[int]], bos: int, eos: int, comma: int) -> list[int]:
    """``[BOS] tag, tag, ... [EOS]`` padded with EOS to 77, from pre-tokenised tags (the CLIP BPE works
    word by word and a comma is its own token, so this equals tokenising the joined caption)."""
    body: list[int] = []
    for i, tokens in enumerate(tag_tokens):
        if i:
            body.append(comma)
        body.extend(tokens)
    body = body[: CONTEXT - 2]
    return [bos, *body, eos] + [eos] * (CONTEXT - 2 - len(body))


def blind_padding(
    context: torch.Tensor, ids: torch.Tensor, empty_context: torch.Tensor, eos: int, rows: torch.Tensor
) -> torch.Tensor:
    """``context`` with, in the captions selected by the bool mask ``rows``, every position from the
    first EOS on replaced by ``empty_context`` (the empty caption's context, (1, 77, C))."""
    first_eos = (ids == eos).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    blind = (positions[None, :] >= first_eos[:, None]) & rows[:, None]
    return torch.where(blind[..., None], empty_context.expand_as(context), context)


class CaptionBatcher:
    """Token ids of training captions: tags pre-tokenised once, reshuffled (and optionally thinned) per
    use, captions dropped to "" for CFG's unconditional prediction.

    Random draws come from torch's global generator in a fixed order (dropout mask, then per caption a
    permutation and, when thinning, a keep mask), so a resumed run replays the same stream."""

    def __init__(self, captions: list[str]) -> None:
        tokenizer = load_clip_tokenizer()
        self._bos, self._eos = tokenizer.bos_id, tokenizer.eos_id
        self._comma = tokenizer.encode(",")[0]
        cache: dict[str, list[int]] = {}
        self._tags = [[cache.setdefault(t, tokenizer.encode(t)) for t in c.split(", ")] for c in captions]
        self._empty = encode_tokens([], self._bos, self._eos, self._comma)
        self._empty_ids = torch.tensor([self._empty])
        used = {tok for tokens in cache.values() for tok in tokens} | {self._bos, self._eos, self._comma}
        self._foreign = torch.tensor([t for t in range(tokenizer.vocab_size) if t not in used])

    @property
    def eos(self) -> int:
        return self._eos

    def empty(self) -> torch.Tensor:
        """(1, 77) ids of the empty caption."""
        return self._empty_ids

    def batch(
        self, indices: list[int], dropout: float, keep_prob: float | None = None,
        foreign_prob: float | None = None,
    ) -> torch.Tensor:
        """(len(indices), 77) ids; ``keep_prob`` keeps each tag with that probability (at least one);
        ``foreign_prob`` adds, with that probability, 1-3 one-token tags the world never uses at random
        places (draws only when given, so runs without it replay the same stream)."""
        drop = torch.rand(len(indices)) < dropout
        rows = []
        for j, i in enumerate(indices):
            if drop[j]:
                rows.append(self._empty)
                continue
            order = torch.randperm(len(self._tags[i])).tolist()
            if keep_prob is not None:
                keep = (torch.rand(len(order)) < keep_prob).tolist()
                order = [k for k, kept in zip(order, keep, strict=True) if kept] or order[:1]
            tags = [self._tags[i][k] for k in order]
            if foreign_prob is not None and float(torch.rand(())) < foreign_prob:
                for _ in range(int(torch.randint(1, 4, ()))):
                    word = [int(self._foreign[torch.randint(len(self._foreign), ())])]
                    tags.insert(int(torch.randint(len(tags) + 1, ())), word)
            rows.append(encode_tokens(tags, self._bos, self._eos, self._comma))
        return torch.tensor(rows, dtype=torch.long)

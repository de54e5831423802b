"""A1111's SDXL conditioning: two text encoders, each its own A1111 wrapper, concatenated.

A1111 wraps SDXL's CLIP ViT-L (``FrozenCLIPEmbedderForSDXLWithCustomWords``) and OpenCLIP ViT-bigG
(``FrozenOpenCLIPEmbedder2WithCustomWords``) separately: each tokenizes the text with its own
tokenizer, cuts its own 75-token chunks (BREAK, comma backtrack), and applies emphasis with its own
mean restoration. sgm's conditioner then concatenates their hidden states on the channel axis
(768 + 1280) and keeps bigG's pooled vector of the first chunk. The refiner has bigG alone.

- CLIP-L pads with its end token; bigG with 0 after the first end token, the last slot included.
- Hidden states: CLIP-L's layer ``num_layers - 1`` (sgm's ``layer_idx`` 11 of 12, no final
  LayerNorm); bigG's penultimate layer (no ``ln_final``). Clip skip has no effect unless A1111's
  ``sdxl_clip_l_skip`` option is on; then CLIP-L takes ``hidden_states[-N]``, still without LayerNorm.
- Pooled: bigG's ``text_projection`` of the final-LayerNorm state at the first end token (the
  largest id, open_clip's ``argmax``) of the first chunk; emphasis never touches it.
- A negative prompt whose schedule texts are all exactly "" encodes as zeros, context and pooled.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voidprompt.conditioning import CondSchedule, MultiCond, ScheduledCond
from voidprompt.errors import InvalidRequestError, PromptError
from voidprompt.models.tokenizer import ClipTokenizer
from voidprompt.prompts.chunks import (
    PromptChunk,
    TokenizedLine,
    check_backtrack,
    check_emphasis,
    embeddings_in_encoder_order,
    token_report,
    tokenize_line,
)
from voidprompt.prompts.embeddings import EmbeddingDatabase
from voidprompt.prompts.encode import (
    CHUNK_TOKENS,
    ConditioningCache,
    apply_emphasis,
    chunk_batches,
    clip_parts,
    embedding_fixes,
    multicond,
)

# A1111's open_clip wrapper: id_pad = 0 (the "!" token) after the first end token.
OPEN_CLIP_PAD_ID = 0


@dataclass(frozen=True)
class _Tower:
    """One of SDXL's text encoders with the tokenizer A1111 gives its wrapper."""

    label: str
    model: nn.Module
    tokenizer: ClipTokenizer
    token_embedding: nn.Embedding
    num_layers: int
    pad_id: int | None  # None: the end token pads, as the tokenizer already did

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def lines(
        self,
        texts: Sequence[str],
        embeddings: EmbeddingDatabase | None,
        emphasis: str,
        comma_padding_backtrack: int,
    ) -> list[TokenizedLine]:
        return [
            tokenize_line(
                t,
                self.tokenizer,
                embeddings,
                emphasis=emphasis,
                comma_padding_backtrack=comma_padding_backtrack,
            )
            for t in texts
        ]

    def ids(self, chunks: Sequence[PromptChunk]) -> torch.Tensor:
        ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
        if self.pad_id is not None:
            for row, chunk in enumerate(chunks):
                # A1111 quirk: the first end token decides, even one the prompt text spelled out.
                first_end = chunk.tokens.index(self.tokenizer.eos_id)
                ids[row, first_end + 1 :] = self.pad_id
        return ids.to(self.token_embedding.weight.device)

    def forward(
        self, chunks: Sequence[PromptChunk], layer: int, emphasis: str, pooled: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states ``hidden_states[layer]`` with emphasis, and the pooled vector if asked."""
        ids = self.ids(chunks)
        # Positions are always 0..76 as int64: merged checkpoints often carry a damaged buffer.
        positions = torch.arange(CHUNK_TOKENS, dtype=torch.long, device=ids.device).expand(len(chunks), -1)
        with torch.no_grad(), embedding_fixes(self.token_embedding, chunks):
            out = self.model(input_ids=ids, position_ids=positions, output_hidden_states=True)
            z = out.hidden_states[layer]
            vector = None
            if pooled:
                # open_clip's pool: the end token is the largest id of each row.
                rows = torch.arange(ids.shape[0], device=ids.device)
                final = out.last_hidden_state[rows, ids.argmax(dim=-1)]
                vector = _text_projection(self.model)(final)
            return apply_emphasis(z, chunks, emphasis), vector


def _text_projection(model: nn.Module) -> nn.Module:
    projection = getattr(model, "text_projection", None)
    if not isinstance(projection, nn.Module):
        raise PromptError(
            f"SDXL's OpenCLIP ViT-bigG must be a CLIPTextModelWithProjection; {type(model).__name__} "
            "has no text_projection"
        )
    return projection


class SDXLPromptEncoder:
    """Encodes prompts for SDXL (CLIP-L + bigG) or its refiner (bigG alone), A1111-faithfully.

    ``tokenizer`` is CLIP-L's (transformers dialect); bigG gets the same vocabulary in open_clip's
    dialect. ``embeddings`` serves CLIP-L's textual-inversion vectors and ``embeddings_g`` bigG's;
    their trigger words are looked up with CLIP-L's tokenizer, as A1111's one embedding database
    does. ``sdxl_clip_l_skip`` is A1111's option of that name. Returned tensors are shared with the
    cache: treat them as read-only.
    """

    def __init__(
        self,
        text_encoder_l: nn.Module | None,
        text_encoder_g: nn.Module,
        tokenizer: ClipTokenizer,
        embeddings: EmbeddingDatabase | None = None,
        *,
        embeddings_g: EmbeddingDatabase | None = None,
        sdxl_clip_l_skip: bool = False,
        cache_size: int = 64,
    ) -> None:
        self.tokenizer = tokenizer.with_dialect("transformers")
        self.tokenizer_g = tokenizer.with_dialect("open_clip")
        self.sdxl_clip_l_skip = sdxl_clip_l_skip
        self.cache_size = cache_size
        _text_projection(text_encoder_g)
        g_embedding, _, g_layers = clip_parts(text_encoder_g)
        self._tower_g = _Tower(
            "OpenCLIP ViT-bigG", text_encoder_g, self.tokenizer_g, g_embedding, g_layers, OPEN_CLIP_PAD_ID
        )
        self._tower_l: _Tower | None = None
        if text_encoder_l is not None:
            l_embedding, _, l_layers = clip_parts(text_encoder_l)
            self._tower_l = _Tower("CLIP ViT-L", text_encoder_l, self.tokenizer, l_embedding, l_layers, None)
        # Plain attributes, read at every call: a caller may swap in databases after a rescan.
        self.embeddings = embeddings
        self.embeddings_g = embeddings_g
        for tower in self._towers:
            self._database(tower)
        self.width = sum(t.width for t in self._towers)
        self._cache = ConditioningCache(cache_size)

    @property
    def _towers(self) -> tuple[_Tower, ...]:
        return (self._tower_g,) if self._tower_l is None else (self._tower_l, self._tower_g)

    @property
    def _first(self) -> _Tower:
        # A1111's token counter comes from the first embedder: CLIP-L, or bigG alone.
        return self._towers[0]

    def _database(self, tower: _Tower) -> EmbeddingDatabase | None:
        database = self.embeddings_g if tower is self._tower_g else self.embeddings
        if database is not None and database.width != tower.width:
            part = "clip_g" if tower is self._tower_g else "clip_l"
            raise PromptError(
                f"the embedding database for {tower.label} was built for width {database.width} but "
                f"that text encoder has width {tower.width}; build EmbeddingDatabase(tokenizer, "
                f"width={tower.width}, sdxl_part={part!r})"
            )
        return database

    def _lines(
        self, tower: _Tower, texts: Sequence[str], emphasis: str, comma_padding_backtrack: int
    ) -> list[TokenizedLine]:
        return tower.lines(texts, self._database(tower), emphasis, comma_padding_backtrack)

    @property
    def cache_hits(self) -> int:
        return self._cache.hits

    @property
    def cache_misses(self) -> int:
        return self._cache.misses

    # ------------------------------------------------------------------ chunking
    def tokenize(
        self, text: str, *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> TokenizedLine:
        """The first text encoder's chunks (CLIP-L's; bigG's for the refiner)."""
        return self._lines(self._first, [text], emphasis, comma_padding_backtrack)[0]

    def token_report(
        self, text: str, *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> str:
        """Printable chunk / weight / token-count report of the first text encoder's chunks."""
        first = self._first
        return token_report(
            text,
            first.tokenizer,
            self._database(first),
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
        )

    def embeddings_used(
        self, texts: Sequence[str], *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> dict[str, str]:
        """``{name: shorthash}`` of embeddings one encoder call over ``texts`` uses, in the order
        A1111's encoder meets them, for infotext ``TI hashes``."""
        lines = self._lines(self._first, texts, emphasis, comma_padding_backtrack)
        return {name: e.shorthash for name, e in embeddings_in_encoder_order(lines).items()}

    def ti_records(
        self, texts: Sequence[str], *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> tuple[dict[str, str], ...]:
        """What one call over ``texts`` adds to A1111's "TI hashes" record, in the order it adds it:
        each text encoder (CLIP-L, then bigG) is its own wrapper that records the embeddings it
        placed, so an SDXL call records a name twice."""
        records = []
        for tower in self._towers:
            lines = self._lines(tower, texts, emphasis, comma_padding_backtrack)
            records.append({name: e.shorthash for name, e in embeddings_in_encoder_order(lines).items()})
        return tuple(records)

    # ------------------------------------------------------------------ encoding
    def _layer(self, tower: _Tower, clip_skip: int, sdxl_clip_l_skip: bool) -> int:
        """Which ``hidden_states`` entry a text encoder gives (no final LayerNorm either way)."""
        num_layers = tower.num_layers
        if tower is self._tower_g:
            return -2  # sgm's "penultimate"
        if not sdxl_clip_l_skip:
            # sgm's "hidden" layer_idx 11 of CLIP-L's 12 layers: the penultimate layer's output.
            return num_layers - 1
        if clip_skip > num_layers:
            raise InvalidRequestError(
                f"clip_skip must be 1..{num_layers} for SDXL's CLIP ViT-L ({num_layers} layers) when "
                f"sdxl_clip_l_skip is on, got {clip_skip}"
            )
        return -clip_skip

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        clip_skip: int,
        emphasis: str = "Original",
        comma_padding_backtrack: int = 20,
        negative: bool = False,
        sdxl_clip_l_skip: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode texts together, A1111-style: context (B, 77*k, 2048) and pooled (B, 1280).

        ``negative``: A1111 zeroes both when every text is exactly "" (its ``is_negative_prompt``
        rule, applied to one prompt's schedule texts). ``sdxl_clip_l_skip`` None: the constructor's.
        """
        if not texts:
            raise PromptError("encode_texts needs at least one text")
        check_emphasis(emphasis)
        check_backtrack(comma_padding_backtrack)
        if clip_skip < 1:
            raise InvalidRequestError(f"clip_skip must be 1 or more, got {clip_skip}")
        clip_l_skip = self._clip_l_skip(sdxl_clip_l_skip)
        layers = [self._layer(tower, clip_skip, clip_l_skip) for tower in self._towers]
        per_tower = [self._lines(tower, texts, emphasis, comma_padding_backtrack) for tower in self._towers]
        self._check_chunk_counts(texts, per_tower)
        hidden: list[torch.Tensor] = []
        pooled: torch.Tensor | None = None
        for tower, lines, layer in zip(self._towers, per_tower, layers, strict=True):
            is_g = tower is self._tower_g
            zs = []
            for i, batch in enumerate(chunk_batches(lines, tower.tokenizer)):
                z, vector = tower.forward(batch, layer, emphasis, pooled=is_g and i == 0)
                zs.append(z)
                if vector is not None:
                    pooled = vector
            hidden.append(torch.hstack(zs))
        assert pooled is not None  # bigG always runs and its first chunk gives the vector
        cond = torch.cat(hidden, dim=2)
        if negative and all(t == "" for t in texts):
            # A1111: sgm's force_zero_embeddings=['txt'] on an all-empty negative batch.
            return torch.zeros_like(cond), torch.zeros_like(pooled)
        return cond, pooled

    def _clip_l_skip(self, option: bool | None) -> bool:
        return self.sdxl_clip_l_skip if option is None else bool(option)

    def _check_chunk_counts(self, texts: Sequence[str], per_tower: Sequence[Sequence[TokenizedLine]]) -> None:
        counts = [max(len(line.chunks) for line in lines) for lines in per_tower]
        if len(set(counts)) <= 1:
            return
        first, second = self._towers
        differing = [
            t
            for t, a, b in zip(texts, per_tower[0], per_tower[1], strict=True)
            if len(a.chunks) != len(b.chunks)
        ]
        shown = differing[0] if differing else texts[0]
        raise PromptError(
            f"the prompt {shown[:80]!r} takes {counts[0]} chunk(s) of 75 tokens for {first.label} but "
            f"{counts[1]} for {second.label} (their tokenizers read HTML entities differently when the "
            "text holds a '<'), and A1111 cannot join them either; write '&' instead of '&amp;' "
            "(and likewise for other entities) or shorten the prompt"
        )

    def encode_schedule(
        self,
        schedule: Sequence[tuple[int, str]],
        *,
        clip_skip: int,
        emphasis: str = "Original",
        comma_padding_backtrack: int = 20,
        model_key: Hashable = None,
        context: Hashable = None,
        negative: bool = False,
        sdxl_clip_l_skip: bool | None = None,
    ) -> CondSchedule:
        """Encode one prompt's schedule ``[(end_at_step, text), ...]`` as a single batch.

        Every entry carries its ``pooled`` vector. ``negative`` marks a negative prompt (A1111 zeroes
        it when all its schedule texts are ""). ``model_key`` and ``context`` join the cache key as
        in :class:`voidprompt.prompts.encode.PromptEncoder`.
        """
        if not schedule:
            raise PromptError("a prompt schedule needs at least one (end_at_step, text) entry")
        sched = tuple((int(step), str(text)) for step, text in schedule)
        clip_l_skip = self._clip_l_skip(sdxl_clip_l_skip)
        key = self._cache_key(
            sched, clip_skip, clip_l_skip, emphasis, comma_padding_backtrack, model_key, context, negative
        )
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        cond, pooled = self.encode_texts(
            [text for _, text in sched],
            clip_skip=clip_skip,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
            negative=negative,
            sdxl_clip_l_skip=clip_l_skip,
        )
        result: CondSchedule = tuple(
            ScheduledCond(step, cond[i], pooled[i]) for i, (step, _) in enumerate(sched)
        )
        self._cache.put(key, result)
        return result

    def encode_multicond(
        self,
        parts: Sequence[tuple[Sequence[tuple[int, str]], float]],
        *,
        clip_skip: int,
        emphasis: str = "Original",
        comma_padding_backtrack: int = 20,
        model_key: Hashable = None,
        context: Hashable = None,
        sdxl_clip_l_skip: bool | None = None,
    ) -> MultiCond:
        """AND-ed sub-prompts of a positive prompt: each schedule encoded (and cached) on its own."""
        return multicond(
            self.encode_schedule,
            parts,
            clip_skip=clip_skip,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
            model_key=model_key,
            context=context,
            sdxl_clip_l_skip=sdxl_clip_l_skip,
        )

    def _cache_key(
        self,
        sched: tuple[tuple[int, str], ...],
        clip_skip: int,
        clip_l_skip: bool,
        emphasis: str,
        comma_padding_backtrack: int,
        model_key: Hashable,
        context: Hashable,
        negative: bool,
    ) -> Hashable:
        databases = [self._database(tower) for tower in self._towers]
        towers = tuple(
            (
                database.signature() if database is not None else (),
                # Device and dtype change the numbers too, whatever the caller's model_key says.
                str(tower.token_embedding.weight.device),
                str(tower.token_embedding.weight.dtype),
            )
            for tower, database in zip(self._towers, databases, strict=True)
        )
        return (
            "sdxl-schedule",
            sched,
            clip_skip,
            clip_l_skip,
            emphasis,
            comma_padding_backtrack,
            model_key,
            context,
            negative,
            towers,
        )

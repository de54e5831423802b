"""A1111's CLIP conditioning: chunks -> text encoder -> weighted, mean-restored, hstacked tensors.

Follows ``FrozenCLIPEmbedderWithCustomWords.forward``: every chunk index of a batch of texts
is one text-encoder call; textual-inversion vectors overwrite token-embedding rows before the
transformer; clip skip takes ``hidden_states[-N]`` through ``final_layer_norm``; emphasis "Original"
restores the mean of the whole chunk batch. A prompt's schedule is encoded as one batch (A1111 does
this, and the mean restoration depends on it); different prompts never share a batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from voidprompt.conditioning import CondSchedule, MultiCond, ScheduledCond
from voidprompt.errors import InvalidRequestError, PromptError
from voidprompt.models.tokenizer import ClipTokenizer
from voidprompt.prompts.chunks import (
    CHUNK_LENGTH,
    PromptChunk,
    TokenizedLine,
    check_backtrack,
    check_emphasis,
    embeddings_in_encoder_order,
    empty_chunk,
    token_report,
    tokenize_line,
)
from voidprompt.prompts.embeddings import EmbeddingDatabase

CHUNK_TOKENS = CHUNK_LENGTH + 2


def _text_model(text_encoder: nn.Module) -> nn.Module:
    # transformers 5.6 flattened CLIPTextModel (embeddings / encoder / final_layer_norm on the model);
    # older versions keep them under ``.text_model``.
    inner = getattr(text_encoder, "text_model", None)
    return inner if isinstance(inner, nn.Module) else text_encoder


def clip_parts(text_encoder: nn.Module) -> tuple[nn.Embedding, nn.Module, int]:
    """A transformers CLIP text model's token embedding, final LayerNorm and layer count."""
    inner = _text_model(text_encoder)
    token_embedding = getattr(getattr(inner, "embeddings", None), "token_embedding", None)
    final_layer_norm = getattr(inner, "final_layer_norm", None)
    if not isinstance(token_embedding, nn.Embedding) or not isinstance(final_layer_norm, nn.Module):
        raise PromptError(
            f"{type(text_encoder).__name__} is not a CLIP text model (no embeddings.token_embedding "
            "or final_layer_norm); pass a transformers CLIPTextModel"
        )
    config = getattr(text_encoder, "config", None)
    return token_embedding, final_layer_norm, int(getattr(config, "num_hidden_layers", 12))


@contextmanager
def embedding_fixes(token_embedding: nn.Embedding, chunks: Sequence[PromptChunk]) -> Iterator[None]:
    """Overwrite token-embedding rows with textual-inversion vectors during one forward."""
    fixes = [(row, fix) for row, chunk in enumerate(chunks) for fix in chunk.fixes]
    if not fixes:
        yield
        return

    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        for row, fix in fixes:
            start = fix.offset + 1  # +1: row 0 is BOS
            # A1111 clips an embedding that runs past the chunk end instead of failing.
            n = min(out.shape[1] - start, fix.embedding.n_vectors)
            out[row, start : start + n] = fix.embedding.vectors[:n].to(out.device, out.dtype)
        return out

    handle = token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def apply_emphasis(z: torch.Tensor, chunks: Sequence[PromptChunk], emphasis: str) -> torch.Tensor:
    """A1111's emphasis on one chunk index's hidden states ``z`` (B, 77, C) of one text encoder.

    "Original" multiplies each token's row by its weight, then rescales the whole batch so that its
    mean is the unweighted one; "No norm" only multiplies; "Ignore" and "None" leave ``z``.
    """
    if emphasis not in ("Original", "No norm"):
        return z
    multipliers = torch.tensor([c.multipliers for c in chunks], dtype=torch.float32, device=z.device)
    original_mean = z.mean()
    z = z * multipliers[..., None]
    if emphasis == "Original":
        # The mean spans every text of this chunk index (the whole encoded batch).
        z = z * (original_mean / z.mean())
    return z


def chunk_batches(lines: Sequence[TokenizedLine], tokenizer: ClipTokenizer) -> list[list[PromptChunk]]:
    """The chunks of every line per chunk index; a line with fewer chunks gets empty chunks."""
    chunk_count = max(len(line.chunks) for line in lines)
    pad = empty_chunk(tokenizer)
    return [[line.chunks[i] if i < len(line.chunks) else pad for line in lines] for i in range(chunk_count)]


class ConditioningCache:
    """An exact-key LRU of encoded schedules, shared by threads; ``size`` 0 stores nothing."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, CondSchedule] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> CondSchedule | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return hit

    def put(self, key: Hashable, value: CondSchedule) -> None:
        if self.size <= 0:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class PromptEncoder:
    """Encodes prompts for one SD1 text encoder, with an exact LRU conditioning cache.

    Returned tensors are shared with the cache: treat them as read-only.
    """

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer: ClipTokenizer,
        embeddings: EmbeddingDatabase | None = None,
        *,
        cache_size: int = 64,
    ) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.embeddings = embeddings
        self.cache_size = cache_size
        self._token_embedding, self._final_layer_norm, self.num_layers = clip_parts(text_encoder)
        self.width = int(self._token_embedding.weight.shape[1])
        if embeddings is not None and embeddings.width != self.width:
            raise PromptError(
                f"the embedding database was built for width {embeddings.width} but the text encoder "
                f"has width {self.width}; build EmbeddingDatabase(tokenizer, width={self.width})"
            )
        self._cache = ConditioningCache(cache_size)

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
        return tokenize_line(
            text,
            self.tokenizer,
            self.embeddings,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
        )

    def token_report(
        self, text: str, *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> str:
        """Printable chunk / weight / token-count report (for ``voidprompt tokens``)."""
        return token_report(
            text,
            self.tokenizer,
            self.embeddings,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
        )

    def embeddings_used(
        self, texts: Sequence[str], *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> dict[str, str]:
        """``{name: shorthash}`` of embeddings one encoder call over ``texts`` uses, in the order
        A1111's encoder meets them, for infotext ``TI hashes``."""
        lines = [
            self.tokenize(text, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)
            for text in texts
        ]
        return {name: e.shorthash for name, e in embeddings_in_encoder_order(lines).items()}

    def ti_records(
        self, texts: Sequence[str], *, emphasis: str = "Original", comma_padding_backtrack: int = 20
    ) -> tuple[dict[str, str], ...]:
        """What one call over ``texts`` adds to A1111's "TI hashes" record: the one text encoder's
        embeddings (SDXL's encoder has one record per text encoder)."""
        used = self.embeddings_used(texts, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)
        return (used,)

    # ------------------------------------------------------------------ encoding
    def _check_clip_skip(self, clip_skip: int) -> None:
        if not 1 <= clip_skip <= self.num_layers:
            raise InvalidRequestError(
                f"clip_skip must be 1..{self.num_layers} for this text encoder "
                f"({self.num_layers} layers), got {clip_skip}"
            )

    def _encode_chunk_batch(
        self, chunks: Sequence[PromptChunk], clip_skip: int, emphasis: str
    ) -> torch.Tensor:
        device = self._token_embedding.weight.device
        ids = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
        # Positions are always 0..76 as int64: merged checkpoints often carry a damaged buffer.
        positions = torch.arange(CHUNK_TOKENS, dtype=torch.long, device=device).expand(len(chunks), -1)
        with torch.no_grad(), embedding_fixes(self._token_embedding, chunks):
            out = self.text_encoder(input_ids=ids, position_ids=positions, output_hidden_states=clip_skip > 1)
            if clip_skip > 1:
                z = self._final_layer_norm(out.hidden_states[-clip_skip])
            else:
                z = out.last_hidden_state
            return apply_emphasis(z, chunks, emphasis)

    def encode_texts(
        self,
        texts: Sequence[str],
        *,
        clip_skip: int,
        emphasis: str = "Original",
        comma_padding_backtrack: int = 20,
    ) -> torch.Tensor:
        """Encode texts together, A1111-style: (B, 77*k, C) with k the largest chunk count."""
        if not texts:
            raise PromptError("encode_texts needs at least one text")
        check_emphasis(emphasis)
        check_backtrack(comma_padding_backtrack)
        self._check_clip_skip(clip_skip)
        lines = [
            self.tokenize(t, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack)
            for t in texts
        ]
        zs = [
            self._encode_chunk_batch(batch, clip_skip, emphasis)
            for batch in chunk_batches(lines, self.tokenizer)
        ]
        return torch.hstack(zs)

    # ------------------------------------------------------------------ cache
    def _cache_key(
        self,
        kind: str,
        payload: Hashable,
        clip_skip: int,
        emphasis: str,
        comma_padding_backtrack: int,
        model_key: Hashable,
        context: Hashable,
    ) -> Hashable:
        emb_sig = self.embeddings.signature() if self.embeddings is not None else ()
        # Device and dtype change the numbers too, whatever the caller's model_key says.
        weight = self._token_embedding.weight
        runtime = (str(weight.device), str(weight.dtype))
        return (
            kind,
            payload,
            clip_skip,
            emphasis,
            comma_padding_backtrack,
            model_key,
            context,
            emb_sig,
            runtime,
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
    ) -> CondSchedule:
        """Encode one prompt's schedule ``[(end_at_step, text), ...]`` as a single batch.

        ``model_key`` must identify the text encoder's current weights (checkpoint hash plus any
        LoRA applied to it); ``context`` may carry steps / hires steps / timeline mode. Both are part
        of the cache key, with every encoding option and the embedding database's signature.
        ``negative`` changes nothing for SD1 (A1111 zeroes empty negative prompts on SDXL only); it
        is accepted so that a caller treats both encoders alike.
        """
        if not schedule:
            raise PromptError("a prompt schedule needs at least one (end_at_step, text) entry")
        sched = tuple((int(step), str(text)) for step, text in schedule)
        key = self._cache_key(
            "schedule", sched, clip_skip, emphasis, comma_padding_backtrack, model_key, context
        )
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        z = self.encode_texts(
            [text for _, text in sched],
            clip_skip=clip_skip,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
        )
        result: CondSchedule = tuple(ScheduledCond(step, z[i]) for i, (step, _) in enumerate(sched))
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
    ) -> MultiCond:
        """AND-ed sub-prompts: each schedule encoded (and cached) on its own, weights kept."""
        return multicond(
            self.encode_schedule,
            parts,
            clip_skip=clip_skip,
            emphasis=emphasis,
            comma_padding_backtrack=comma_padding_backtrack,
            model_key=model_key,
            context=context,
        )


def multicond(
    encode_schedule: Callable[..., CondSchedule],
    parts: Sequence[tuple[Sequence[tuple[int, str]], float]],
    **options: Any,
) -> MultiCond:
    """A positive prompt's AND-ed sub-prompts: each schedule through ``encode_schedule(schedule,
    **options)`` on its own (so each is cached on its own), with its weight."""
    if not parts:
        raise PromptError("a positive prompt needs at least one sub-prompt")
    return MultiCond(tuple((encode_schedule(sched, **options), float(weight)) for sched, weight in parts))

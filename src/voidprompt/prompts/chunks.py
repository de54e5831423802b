"""A1111's prompt chunking (``sd_hijack_clip.tokenize_line``).

A prompt line becomes 77-token chunks ``[BOS] + 75 + [EOS]`` with one multiplier per token. The
comma backtrack, BREAK, textual-inversion placement and the token counter follow A1111 exactly,
quirks included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from voidprompt.errors import InvalidRequestError
from voidprompt.models.tokenizer import ClipTokenizer
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase
from voidprompt.prompts.parse import BREAK_WEIGHT, parse_prompt_attention
from voidprompt.request import EMPHASIS_MODES

CHUNK_LENGTH: Final[int] = 75
# Placeholder id under an embedding's rows; A1111 uses 0 (the "!" token), overwritten before use.
EMBEDDING_PLACEHOLDER_ID: Final[int] = 0


@dataclass(frozen=True)
class ChunkFix:
    """Embedding vectors to write over token rows ``offset+1 ..`` (``+1`` skips BOS) of a chunk."""

    offset: int
    embedding: Embedding


@dataclass
class PromptChunk:
    """77 token ids and multipliers once closed; ``fixes`` place textual-inversion vectors.

    ``sources[i]`` is the index into the line's ``pieces`` of the prompt token at row i, or -1 for
    the start, end and padding rows (what attention maps read back to the prompt)."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[ChunkFix] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LinePiece:
    """One prompt token of a line, in prompt order: its id (an embedding's vectors are one piece
    each, id ``EMBEDDING_PLACEHOLDER_ID``), its emphasis weight, the parsed fragment it came from and
    its text. ``embedding`` names the embedding a vector row belongs to (its first vector's text is
    ``<name>``, the others' empty)."""

    token: int
    weight: float
    fragment: int
    text: str
    embedding: str | None = None


@dataclass(frozen=True)
class TokenizedLine:
    chunks: tuple[PromptChunk, ...]
    # A1111's counter: 75 for every full chunk plus the real length of the last one.
    token_count: int
    # The prompt's own tokens in order; chunks' ``sources`` index into it.
    pieces: tuple[LinePiece, ...] = ()
    # The (text, weight) fragments the chunker saw (see parse_for_emphasis).
    fragments: tuple[tuple[str, float], ...] = ()

    @property
    def embeddings_used(self) -> dict[str, Embedding]:
        return {fix.embedding.name: fix.embedding for c in self.chunks for fix in c.fixes}


def embeddings_in_encoder_order(lines: Sequence[TokenizedLine]) -> dict[str, Embedding]:
    """The embeddings one encoder call over ``lines`` places, in the order A1111's encoder meets
    them: chunk by chunk across the texts (every text's first chunk, then every second chunk, ...),
    each name at its first appearance."""
    used: dict[str, Embedding] = {}
    for index in range(max((len(line.chunks) for line in lines), default=0)):
        for line in lines:
            if index < len(line.chunks):
                for fix in line.chunks[index].fixes:
                    used.setdefault(fix.embedding.name, fix.embedding)
    return used


def check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise InvalidRequestError(
            f"unknown emphasis mode {emphasis!r}; use one of {', '.join(repr(m) for m in EMPHASIS_MODES)}"
        )


def check_backtrack(comma_padding_backtrack: int) -> None:
    if not 0 <= comma_padding_backtrack < CHUNK_LENGTH:
        raise InvalidRequestError(
            f"comma_padding_backtrack must be 0..{CHUNK_LENGTH - 1} (A1111's 'Prompt word wrap length "
            f"limit'), got {comma_padding_backtrack}"
        )


def target_token_count(token_count: int) -> int:
    """The denominator of A1111's ``12/75`` counter: the next multiple of 75 (at least 75)."""
    return math.ceil(max(token_count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def empty_chunk(tokenizer: ClipTokenizer) -> PromptChunk:
    """``[BOS] + [EOS]*76``: the chunk of an empty prompt, and the padding for shorter prompts."""
    n = CHUNK_LENGTH + 2
    return PromptChunk([tokenizer.bos_id] + [tokenizer.eos_id] * (n - 1), [1.0] * n, sources=[-1] * n)


def parse_for_emphasis(text: str, emphasis: str) -> list[tuple[str, float]]:
    """The (text, weight) fragments the chunker sees under an emphasis mode."""
    check_emphasis(emphasis)
    if emphasis == "None":
        # No parsing: brackets and BREAK are literal text.
        return [(text, 1.0)]
    parsed = parse_prompt_attention(text)
    if emphasis == "Ignore":
        return [(t, w if _is_break(t, w) else 1.0) for t, w in parsed]
    return parsed


def _is_break(text: str, weight: float) -> bool:
    # Exactly A1111's test; a BREAK inside brackets has another weight and stays text.
    return text == "BREAK" and weight == BREAK_WEIGHT


def tokenize_line(
    text: str,
    tokenizer: ClipTokenizer,
    embeddings: EmbeddingDatabase | None = None,
    *,
    emphasis: str = "Original",
    comma_padding_backtrack: int = 20,
) -> TokenizedLine:
    """Split one prompt text into closed 77-token chunks with multipliers and embedding fixes."""
    check_backtrack(comma_padding_backtrack)
    parsed = parse_for_emphasis(text, emphasis)

    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1
    pieces: list[LinePiece] = []

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        pad = CHUNK_LENGTH - len(chunk.tokens)
        if pad > 0:
            chunk.tokens += [tokenizer.eos_id] * pad
            chunk.multipliers += [1.0] * pad
            chunk.sources += [-1] * pad
        chunk.tokens = [tokenizer.bos_id, *chunk.tokens, tokenizer.eos_id]
        chunk.multipliers = [1.0, *chunk.multipliers, 1.0]
        chunk.sources = [-1, *chunk.sources, -1]
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for fragment, (frag_text, weight) in enumerate(parsed):
        if _is_break(frag_text, weight):
            next_chunk()
            continue
        tokens = tokenizer.encode(frag_text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == tokenizer.comma_id:
                # A1111 quirk: recorded before the full-chunk check below, so a comma arriving at a
                # full chunk is forgotten when that chunk closes.
                last_comma = len(chunk.tokens)
            elif (
                comma_padding_backtrack != 0
                and len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= comma_padding_backtrack
            ):
                cut = last_comma + 1
                moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                moved_sources = chunk.sources[cut:]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.sources = chunk.sources[:cut]
                # A1111 quirk: fixes are not moved with their tokens. An embedding in the moved tail
                # keeps writing into the old chunk's padding, and its placeholders in the new chunk
                # stay plain id-0 tokens.
                next_chunk()
                chunk.tokens, chunk.multipliers = moved_tokens, moved_mults
                chunk.sources = moved_sources
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()

            found = embeddings.find_at(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                chunk.sources.append(len(pieces))
                pieces.append(LinePiece(token, weight, fragment, tokenizer.decode([token])))
                position += 1
                continue
            emb, n_trigger = found
            if len(chunk.tokens) + emb.n_vectors > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append(ChunkFix(len(chunk.tokens), emb))
            chunk.tokens += [EMBEDDING_PLACEHOLDER_ID] * emb.n_vectors
            chunk.multipliers += [weight] * emb.n_vectors
            chunk.sources += range(len(pieces), len(pieces) + emb.n_vectors)
            texts = [f"<{emb.name}>"] + [""] * (emb.n_vectors - 1)
            pieces += [LinePiece(EMBEDDING_PLACEHOLDER_ID, weight, fragment, t, emb.name) for t in texts]
            position += n_trigger

    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return TokenizedLine(tuple(chunks), token_count, tuple(pieces), tuple(parsed))


def token_report(
    text: str,
    tokenizer: ClipTokenizer,
    embeddings: EmbeddingDatabase | None = None,
    *,
    emphasis: str = "Original",
    comma_padding_backtrack: int = 20,
) -> str:
    """A printable account of how ``text`` is chunked: counter, chunks, weight runs, embeddings."""
    line = tokenize_line(
        text, tokenizer, embeddings, emphasis=emphasis, comma_padding_backtrack=comma_padding_backtrack
    )
    out = [
        f"tokens: {line.token_count}/{target_token_count(line.token_count)}"
        f"  chunks: {len(line.chunks)}  emphasis: {emphasis}  comma backtrack: {comma_padding_backtrack}"
    ]
    for i, chunk in enumerate(line.chunks):
        body_tokens = chunk.tokens[1:-1]
        fix_starts = {fix.offset: fix.embedding for fix in chunk.fixes}
        fix_rows = {fix.offset + k for fix in chunk.fixes for k in range(fix.embedding.n_vectors)}
        # Real tokens: everything before the EOS padding (placeholders of embeddings are real).
        used = len(body_tokens)
        while used > 0 and body_tokens[used - 1] == tokenizer.eos_id and (used - 1) not in fix_rows:
            used -= 1
        out.append(f"chunk {i + 1}: {used} tokens, {CHUNK_LENGTH - used} padding")
        j = 0
        while j < used:
            weight = chunk.multipliers[j + 1]
            k = j
            pieces: list[str] = []
            while k < used and chunk.multipliers[k + 1] == weight:
                if k in fix_starts:
                    emb = fix_starts[k]
                    pieces.append(f"<{emb.name}>")
                    k += emb.n_vectors
                    continue
                pieces.append(tokenizer.token_text(body_tokens[k]).replace("</w>", " ").rstrip())
                k += 1
            out.append(f"  [{j + 1:>2}-{k:>2}] x{weight:g}: {' '.join(pieces)}")
            j = k
    used_emb = line.embeddings_used
    if used_emb:
        out.append(
            "embeddings: "
            + ", ".join(
                f"{n} ({e.n_vectors} vectors, {e.shorthash or 'no hash'})" for n, e in used_emb.items()
            )
        )
    return "\n".join(out)

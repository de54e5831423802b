"""Prompt tokens and tags as the attention maps read them back from the chunks' rows.

Every expectation is derived apart from the chunker: a tag's tokens are the tokenizer's own encoding
of the tag's text, weights are A1111's emphasis arithmetic (1.1 per round bracket, 1/1.1 per square
one), and each row of a closed chunk either holds no prompt token (start, end, padding) or the very
token id of the piece it names.
"""

from __future__ import annotations

import pytest
import torch

from voidprompt.explain.tags import PromptTokens, prompt_tokens
from voidprompt.models.tokenizer import ClipTokenizer, load_clip_tokenizer
from voidprompt.prompts.chunks import EMBEDDING_PLACEHOLDER_ID, TokenizedLine, tokenize_line
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase

ROWS = 77


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


def tags_of(text: str, tok: ClipTokenizer, **kw: object) -> tuple[TokenizedLine, PromptTokens]:
    line = tokenize_line(text, tok, **kw)  # type: ignore[arg-type]
    return line, prompt_tokens(line, tok.comma_id)


def tag_ids(tokens: PromptTokens, line: TokenizedLine, index: int) -> list[int]:
    return [line.pieces[i].token for i in tokens.tags[index].tokens]


def check_rows(line: TokenizedLine, tokens: PromptTokens) -> None:
    """Each chunk row names the piece whose token it holds; start, end and padding rows name none;
    every piece sits in exactly one row, in prompt order."""
    assert len(tokens.rows) == ROWS * len(line.chunks)
    seen = []
    for c, chunk in enumerate(line.chunks):
        for r in range(ROWS):
            source = tokens.rows[c * ROWS + r]
            if r in (0, ROWS - 1):
                assert source == -1
            if source == -1:
                continue
            seen.append(source)
            piece = line.pieces[source]
            assert chunk.tokens[r] == piece.token
    assert seen == list(range(len(line.pieces)))


def test_commas_split_tags_and_belong_to_none(tok: ClipTokenizer) -> None:
    line, tokens = tags_of("red ball, blue cube,green  cone", tok)
    assert [t.label for t in tokens.tags] == ["red ball", "blue cube", "green cone"]
    for i, label in enumerate(["red ball", "blue cube", "green cone"]):
        assert tag_ids(tokens, line, i) == tok.encode(label)
    in_tags = {i for tag in tokens.tags for i in tag.tokens}
    commas = {i for i, p in enumerate(line.pieces) if p.token == tok.comma_id}
    assert len(commas) == 2 and not commas & in_tags
    assert in_tags | commas == set(range(len(line.pieces)))
    assert all(t.weight == 1.0 for t in tokens.tags)
    # Rows: start, the 8 prompt tokens in order, then end/padding.
    n = len(tok.encode("red ball, blue cube,green  cone"))
    assert n == 8
    assert tokens.rows[: n + 2] == (-1, *range(n), -1)
    check_rows(line, tokens)


def test_emphasis_groups_are_tags_with_their_weight(tok: ClipTokenizer) -> None:
    line, tokens = tags_of("lowres, (bad hands:1.2), blurry", tok)
    expected = [("lowres", 1.0), ("bad hands", 1.2), ("blurry", 1.0)]
    assert [(t.label, t.weight) for t in tokens.tags] == expected
    assert tag_ids(tokens, line, 0) == tok.encode("lowres")  # two BPE tokens, one tag
    assert len(tokens.tags[0].tokens) == 2
    # A comma inside a group still splits it; both halves keep the group's weight.
    line, tokens = tags_of("(red ball, blue cube:1.3)", tok)
    assert [(t.label, t.weight) for t in tokens.tags] == [("red ball", 1.3), ("blue cube", 1.3)]
    assert tokens.weights == (1.3,) * 5
    check_rows(line, tokens)


def test_nested_emphasis(tok: ClipTokenizer) -> None:
    line, tokens = tags_of("((red)) ball, (a [b] c)", tok)
    labels = [t.label for t in tokens.tags]
    assert labels == ["red", "ball", "a", "b", "c"]
    weights = [t.weight for t in tokens.tags]
    assert weights == pytest.approx([1.1 * 1.1, 1.0, 1.1, 1.1 / 1.1, 1.1])
    for i, label in enumerate(labels):
        assert tag_ids(tokens, line, i) == tok.encode(label)
    check_rows(line, tokens)


def test_break_starts_a_chunk_and_a_tag(tok: ClipTokenizer) -> None:
    line, tokens = tags_of("red ball BREAK blue cube", tok)
    assert len(line.chunks) == 2
    assert [t.label for t in tokens.tags] == ["red ball", "blue cube"]
    assert tokens.rows[:4] == (-1, 0, 1, -1)
    assert tokens.rows[ROWS : ROWS + 4] == (-1, 2, 3, -1)
    check_rows(line, tokens)


WORDS = [
    *("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "brown", "pink", "grey"),
    *("gold", "silver", "cyan", "magenta", "violet", "circle", "square", "triangle", "star", "heart"),
    *("cross", "ring", "moon", "sun", "tree", "house", "river", "mountain", "cloud", "bird", "fish"),
    *("horse", "dog", "cat", "flower", "leaf", "stone", "wave", "fire", "snow"),
]


def test_long_prompt_second_chunk_maps_back(tok: ClipTokenizer) -> None:
    # Two-word tags: 40 tags x 3 tokens (two words and a comma) = 120 tokens, two chunks.
    labels = [f"{WORDS[i % len(WORDS)]} {WORDS[(7 * i + 3) % len(WORDS)]}" for i in range(40)]
    text = ", ".join(labels)
    line, tokens = tags_of(text, tok, comma_padding_backtrack=0)
    assert len(line.chunks) == 2
    assert [t.label for t in tokens.tags] == labels
    for i, label in enumerate(labels):
        assert tag_ids(tokens, line, i) == tok.encode(label)
    assert [p.token for p in line.pieces] == tok.encode(text)
    # Without backtrack the first chunk holds the first 75 tokens; chunk 2's row 1 is token 75.
    assert tokens.rows[ROWS - 1] == -1 and tokens.rows[ROWS] == -1
    assert tokens.rows[ROWS + 1] == 75
    check_rows(line, tokens)


def test_comma_backtrack_moves_tokens_with_their_rows(tok: ClipTokenizer) -> None:
    # 60 a, a comma, 20 b: the backtrack moves the b's that had filled chunk 1 into chunk 2.
    text = "a " * 60 + ", " + "b " * 20
    line, tokens = tags_of(text, tok)
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    assert line.chunks[0].tokens[1:62] == [a] * 60 + [tok.comma_id]
    assert tokens.rows[62:ROWS] == (-1,) * (ROWS - 62)  # padding left by the move
    assert tokens.rows[ROWS + 1 : ROWS + 21] == tuple(range(61, 81))
    assert [line.pieces[i].token for i in tokens.rows[ROWS + 1 : ROWS + 21]] == [b] * 20
    assert [len(t.tokens) for t in tokens.tags] == [60, 20]
    check_rows(line, tokens)


def test_textual_inversion_embedding_rows_are_one_tag(tok: ClipTokenizer) -> None:
    db = EmbeddingDatabase(tok, width=32)
    db.add(Embedding("bad hands", torch.ones(3, 32)))
    line = tokenize_line("lowres, bad hands, (blurry:1.2)", tok, db)
    tokens = prompt_tokens(line, tok.comma_id)
    expected = [("lowres", 1.0), ("<bad hands>", 1.0), ("blurry", 1.2)]
    assert [(t.label, t.weight) for t in tokens.tags] == expected
    emb = tokens.tags[1]
    assert len(emb.tokens) == 3
    assert all(line.pieces[i].embedding == "bad hands" for i in emb.tokens)
    # The embedding's three vectors sit in rows 4-6 (after start, low, res, comma).
    assert tokens.rows[4:7] == emb.tokens
    assert line.chunks[0].tokens[4:7] == [EMBEDDING_PLACEHOLDER_ID] * 3
    assert line.chunks[0].fixes[0].offset == 3  # the fix's offset skips the start row
    check_rows(line, tokens)


def test_rows_past_the_text_map_to_no_token(tok: ClipTokenizer) -> None:
    _, tokens = tags_of("red ball, blue cube", tok)
    n = len(tok.encode("red ball, blue cube"))
    # A batch's padding chunk or "Pad conds" adds empty chunks after the text's own.
    index = tokens.row_index(3 * ROWS)
    assert index.shape == (3 * ROWS,)
    assert index[1 : n + 1].tolist() == list(range(n))
    assert (index[n + 1 :] == -1).all()
    assert index[0] == -1
    # Shorter than the text's own chunks: cut, not padded.
    assert tokens.row_index(4).tolist() == [-1, 0, 1, 2]

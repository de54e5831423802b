"""A1111 chunking: 75-token chunks, comma backtrack, BREAK, emphasis modes, token report.

Expected chunks are written out by hand from A1111's ``sd_hijack_clip.tokenize_line``. Token ids used:
"a" = 320, "b" = 321,
"," = 267 (single-token words), BOS 49406, EOS 49407.
"""

from __future__ import annotations

import pytest

from voidprompt.errors import InvalidRequestError
from voidprompt.models.tokenizer import ClipTokenizer, load_clip_tokenizer
from voidprompt.prompts.chunks import (
    empty_chunk,
    target_token_count,
    token_report,
    tokenize_line,
)

A, B, COMMA, BOS, EOS = 320, 321, 267, 49406, 49407


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


def closed(body: list[int]) -> list[int]:
    """BOS + body padded with EOS to 75 + EOS: the hand-written form of a closed chunk."""
    assert len(body) <= 75
    return [BOS, *body, *[EOS] * (75 - len(body)), EOS]


def test_ids_used_here(tok: ClipTokenizer) -> None:
    assert tok.encode("a b , a") == [A, B, COMMA, A]


def test_empty_prompt(tok: ClipTokenizer) -> None:
    line = tokenize_line("", tok)
    assert len(line.chunks) == 1
    assert line.chunks[0].tokens == [BOS] + [EOS] * 76
    assert line.chunks[0].multipliers == [1.0] * 77
    assert line.token_count == 0
    assert empty_chunk(tok).tokens == line.chunks[0].tokens


def test_plain_overflow(tok: ClipTokenizer) -> None:
    line = tokenize_line("a " * 80, tok)
    assert [c.tokens for c in line.chunks] == [closed([A] * 75), closed([A] * 5)]
    assert all(len(c.multipliers) == 77 for c in line.chunks)
    # A1111 counter: 75 for the full chunk + 5 real tokens in the last one.
    assert line.token_count == 80
    assert target_token_count(80) == 150
    assert target_token_count(0) == 75
    assert target_token_count(75) == 75


def test_exactly_75_tokens_is_one_chunk(tok: ClipTokenizer) -> None:
    line = tokenize_line("a " * 75, tok)
    assert [c.tokens for c in line.chunks] == [closed([A] * 75)]
    assert line.token_count == 75


def test_comma_backtrack(tok: ClipTokenizer) -> None:
    # 60 a, a comma at index 60, then 20 b. The chunk fills at 60 a + "," + 14 b; the 15th b finds a
    # full chunk with the last comma 75 - 60 = 15 <= 20 tokens from its end, so the 14 b move on.
    text = "a " * 60 + ", " + "b " * 20
    line = tokenize_line(text, tok)
    assert [c.tokens for c in line.chunks] == [closed([A] * 60 + [COMMA]), closed([B] * 20)]
    assert line.token_count == 75 + 20

    # Backtrack limit 15 still reaches (15 <= 15); 14 does not.
    assert tokenize_line(text, tok, comma_padding_backtrack=15).chunks[0].tokens == closed([A] * 60 + [COMMA])
    no_bt = [closed([A] * 60 + [COMMA] + [B] * 14), closed([B] * 6)]
    assert [c.tokens for c in tokenize_line(text, tok, comma_padding_backtrack=14).chunks] == no_bt
    assert [c.tokens for c in tokenize_line(text, tok, comma_padding_backtrack=0).chunks] == no_bt


def test_backtrack_keeps_weights(tok: ClipTokenizer) -> None:
    text = "a " * 70 + ", (b:1.5) " * 1 + "(b:1.5) " * 10
    line = tokenize_line(text, tok)
    # 70 a + comma fill 71; 4 weighted b reach 75; the 5th b triggers: 4 b move to the next chunk.
    assert line.chunks[0].tokens == closed([A] * 70 + [COMMA])
    assert line.chunks[1].tokens == closed([B] * 11)
    assert line.chunks[1].multipliers == [1.0] + [1.5] * 11 + [1.0] * 65


def test_comma_arriving_at_full_chunk_is_forgotten(tok: ClipTokenizer) -> None:
    # A1111 quirk: the 76th token is a comma; it starts chunk 2 and last_comma resets with the chunk,
    # so no backtrack happens later even though a comma is near.
    text = "a " * 75 + ", " + "b " * 80
    chunks = tokenize_line(text, tok).chunks
    assert chunks[0].tokens == closed([A] * 75)
    assert chunks[1].tokens == closed([COMMA] + [B] * 74)
    assert chunks[2].tokens == closed([B] * 6)


def test_backtrack_resets_per_chunk(tok: ClipTokenizer) -> None:
    # A comma early in chunk 1 must not pull tokens when chunk 2 fills.
    text = "a " * 70 + ", " + "b " * 100
    chunks = tokenize_line(text, tok).chunks
    assert chunks[0].tokens == closed([A] * 70 + [COMMA])
    assert chunks[1].tokens == closed([B] * 75)
    assert chunks[2].tokens == closed([B] * 25)


def test_break(tok: ClipTokenizer) -> None:
    line = tokenize_line("a BREAK b", tok)
    assert [c.tokens for c in line.chunks] == [closed([A]), closed([B])]
    assert line.token_count == 75 + 1
    # A trailing BREAK adds no extra empty chunk; a leading one gives an all-padding chunk first.
    assert [c.tokens for c in tokenize_line("a BREAK", tok).chunks] == [closed([A])]
    assert [c.tokens for c in tokenize_line("BREAK a", tok).chunks] == [closed([]), closed([A])]
    # Emphasis "None": BREAK is just a word.
    none_line = tokenize_line("a BREAK b", tok, emphasis="None")
    assert none_line.chunks[0].tokens == closed([A, *tok.encode("BREAK"), B])


def test_weights_and_modes(tok: ClipTokenizer) -> None:
    line = tokenize_line("(a:1.5) b [a]", tok)
    assert line.chunks[0].tokens == closed([A, B, A])
    assert line.chunks[0].multipliers == [1.0, 1.5, 1.0, 1 / 1.1] + [1.0] * 73
    ignore = tokenize_line("(a:1.5) b [a]", tok, emphasis="Ignore")
    assert ignore.chunks[0].tokens == closed([A, B, A])
    assert ignore.chunks[0].multipliers == [1.0] * 77
    none = tokenize_line("(a:1.5) b", tok, emphasis="None")
    assert none.chunks[0].tokens == closed(tok.encode("(a:1.5) b"))
    assert none.chunks[0].multipliers == [1.0] * 77


def test_full_width_comma(tok: ClipTokenizer) -> None:
    assert tokenize_line("a，b", tok).chunks[0].tokens == tokenize_line("a,b", tok).chunks[0].tokens


def test_long_prompt(tok: ClipTokenizer) -> None:
    line = tokenize_line("a " * 1000, tok)
    assert len(line.chunks) == 14  # ceil(1000 / 75)
    assert line.token_count == 1000
    assert sum(c.tokens.count(A) for c in line.chunks) == 1000


def test_bad_options(tok: ClipTokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="emphasis"):
        tokenize_line("a", tok, emphasis="Loud")
    with pytest.raises(InvalidRequestError, match="comma_padding_backtrack"):
        tokenize_line("a", tok, comma_padding_backtrack=-1)


def test_token_report(tok: ClipTokenizer) -> None:
    report = token_report("(a:1.5) b BREAK " + "a " * 80, tok)
    lines = report.splitlines()
    assert lines[0].startswith("tokens: 155/225  chunks: 3")
    assert "chunk 1: 2 tokens, 73 padding" in lines
    assert "  [ 1- 1] x1.5: a" in lines
    assert "  [ 2- 2] x1: b" in lines
    assert "chunk 2: 75 tokens, 0 padding" in lines
    assert "chunk 3: 5 tokens, 70 padding" in lines

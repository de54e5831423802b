"""Textual inversion: file formats, trigger matching, chunk placement, injection at the embedding layer."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from voidprompt.errors import PromptError
from voidprompt.models.tokenizer import ClipTokenizer, load_clip_tokenizer
from voidprompt.prompts.chunks import ChunkFix, tokenize_line
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder

A, B, BOS, EOS = 320, 321, 49406, 49407
WIDTH = 32


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


def make_db(tok: ClipTokenizer, **vectors: torch.Tensor) -> EmbeddingDatabase:
    db = EmbeddingDatabase(tok, width=WIDTH)
    for name, vec in vectors.items():
        db.add(Embedding(name.replace("_", " "), vec))
    return db


def test_load_formats(tok: ClipTokenizer, tmp_path: Path) -> None:
    torch.manual_seed(0)
    a1111 = torch.randn(2, WIDTH)
    concept = torch.randn(WIDTH)
    easy = torch.randn(8, WIDTH)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(a1111.clone())},
            "name": "style",
            "step": 3000,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "model",
        },
        tmp_path / "mystyle.pt",
    )
    torch.save({"<concept>": concept.clone()}, tmp_path / "concept.bin")
    sub = tmp_path / "negatives"
    sub.mkdir()
    save_file({"emb_params": easy.clone()}, str(sub / "EasyNegative.safetensors"))
    (tmp_path / "notes.txt").write_text("not an embedding")

    db = EmbeddingDatabase(tok, width=WIDTH)
    loaded = db.load_folder(tmp_path)
    assert sorted(e.name for e in loaded) == ["EasyNegative", "concept", "mystyle"]
    assert torch.equal(db.embeddings["mystyle"].vectors, a1111)
    assert torch.equal(db.embeddings["concept"].vectors, concept[None])
    assert torch.equal(db.embeddings["EasyNegative"].vectors, easy)
    expected = hashlib.sha256((sub / "EasyNegative.safetensors").read_bytes()).hexdigest()
    assert db.embeddings["EasyNegative"].sha256 == expected
    assert db.embeddings["EasyNegative"].shorthash == expected[:12]


def test_wrong_width_skipped_then_error(
    tok: ClipTokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "bigneg.safetensors"))
    db = EmbeddingDatabase(tok, width=WIDTH)
    with caplog.at_level(logging.WARNING):
        assert db.load_folder(tmp_path) == []
    assert "bigneg" in caplog.text and "768" in caplog.text and str(WIDTH) in caplog.text
    with pytest.raises(PromptError, match=r"bigneg.*768"):
        tokenize_line("a bigneg", tok, db)
    # An unknown name is just text.
    other = tok.encode("otherneg")
    assert tokenize_line("a otherneg", tok, db).chunks[0].tokens[1 : 2 + len(other)] == [A, *other]


def test_bad_files_skipped(tok: ClipTokenizer, tmp_path: Path) -> None:
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    torch.save({"x": torch.zeros(1, WIDTH), "y": torch.zeros(1, WIDTH)}, tmp_path / "two.bin")
    db = EmbeddingDatabase(tok, width=WIDTH)
    assert db.load_folder(tmp_path) == []
    assert set(db.skipped) == {"broken", "two"}
    with pytest.raises(PromptError, match="2 tensors"):
        tokenize_line("two", tok, db)
    with pytest.raises(PromptError, match="does not exist"):
        db.load_folder(tmp_path / "missing")


def test_placement_and_longest_match(tok: ClipTokenizer) -> None:
    db = make_db(tok, bad=torch.ones(1, WIDTH), bad_hands=torch.ones(3, WIDTH))
    assert tok.encode("bad hands") == tok.encode("bad") + tok.encode("hands")
    line = tokenize_line("a bad hands b bad (b:1.2)", tok, db)
    chunk = line.chunks[0]
    # a, 3 placeholders (longest trigger "bad hands"), b, 1 placeholder ("bad"), b weighted.
    assert chunk.tokens == [BOS, A, 0, 0, 0, B, 0, B] + [EOS] * 69
    assert chunk.multipliers[:8] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2]
    assert chunk.fixes == [ChunkFix(1, db.embeddings["bad hands"]), ChunkFix(5, db.embeddings["bad"])]
    # Weighted embedding: its placeholders carry the fragment weight.
    weighted = tokenize_line("(bad hands:0.8)", tok, db).chunks[0]
    assert weighted.multipliers[1:4] == [0.8, 0.8, 0.8]


def test_overflow_starts_next_chunk(tok: ClipTokenizer) -> None:
    db = make_db(tok, bad_hands=torch.ones(3, WIDTH))
    line = tokenize_line("a " * 73 + "bad hands b", tok, db)
    first, second = line.chunks
    # 73 + 3 > 75: the chunk closes first, padded, and the embedding starts chunk 2 at offset 0.
    assert first.tokens == [BOS] + [A] * 73 + [EOS] * 3
    assert first.fixes == []
    assert second.tokens == [BOS, 0, 0, 0, B] + [EOS] * 72
    assert second.fixes == [ChunkFix(0, db.embeddings["bad hands"])]
    # Exactly fitting: 72 + 3 = 75 stays in chunk 1.
    fit = tokenize_line("a " * 72 + "bad hands", tok, db)
    assert len(fit.chunks) == 1
    assert fit.chunks[0].fixes == [ChunkFix(72, db.embeddings["bad hands"])]


def test_rows_replaced_at_embedding_layer(tok: ClipTokenizer) -> None:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    model = CLIPTextModel(config).eval()
    vec = torch.randn(3, WIDTH)
    db = make_db(tok, bad_hands=vec)
    enc = PromptEncoder(model, tok, db)
    captured: list[torch.Tensor] = []
    handle = model.embeddings.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        enc.encode_texts(["a bad hands b", "b"], clip_skip=1)
    finally:
        handle.remove()
    got = captured[0]
    # Independent expectation: token table rows for the ids, with rows 2..4 of text 0 (after BOS and
    # "a") replaced by the vectors, plus position embeddings 0..76.
    tok_w = model.embeddings.token_embedding.weight.detach()
    pos_w = model.embeddings.position_embedding.weight.detach()
    ids0 = [BOS, A, 0, 0, 0, B] + [EOS] * 71
    ids1 = [BOS, B] + [EOS] * 75
    rows0 = tok_w[ids0].clone()
    rows0[2:5] = vec
    expected = torch.stack([rows0, tok_w[ids1]]) + pos_w[None]
    assert torch.equal(got, expected)
    # Only the three embedding rows differ from the plain placeholder embedding.
    plain = tok_w[ids0] + pos_w
    differs = (got[0] != plain).any(dim=1).nonzero().flatten().tolist()
    assert differs == [2, 3, 4]
    # The hook is gone afterwards: a plain forward is untouched.
    out = model.embeddings(input_ids=torch.tensor([ids0]))
    assert torch.equal(out[0], plain)


def test_signature_changes(tok: ClipTokenizer) -> None:
    db = make_db(tok, bad=torch.ones(1, WIDTH))
    sig = db.signature()
    db.add(Embedding("good", torch.zeros(1, WIDTH)))
    assert db.signature() != sig
    db2 = make_db(tok, bad=torch.full((1, WIDTH), 2.0))
    assert db2.signature() != sig


def test_backtrack_leaves_fix_behind(tok: ClipTokenizer) -> None:
    # A1111 quirk: the comma backtrack moves tokens but not fixes. 60 a, "," at 60, the embedding's
    # 3 placeholders at 61..63 (fix offset 61), 11 b fill the chunk; the 12th b backtracks to the
    # comma: placeholders and b move to chunk 2 as plain id-0 tokens, the fix stays in chunk 1.
    db = make_db(tok, bad_hands=torch.ones(3, WIDTH))
    line = tokenize_line("a " * 60 + ", bad hands " + "b " * 15, tok, db)
    first, second = line.chunks
    assert first.tokens == [BOS] + [A] * 60 + [267] + [EOS] * 15
    assert first.fixes == [ChunkFix(61, db.embeddings["bad hands"])]
    assert second.tokens == [BOS, 0, 0, 0] + [B] * 15 + [EOS] * 58
    assert second.fixes == []

"""PromptEncoder on a tiny in-memory CLIPTextModel: weights, mean restoration, clip skip, cache."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from voidprompt.conditioning import MultiCond, ScheduledCond
from voidprompt.errors import InvalidRequestError
from voidprompt.models.tokenizer import ClipTokenizer, load_clip_tokenizer
from voidprompt.prompts.embeddings import Embedding, EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder

BOS, EOS = 49406, 49407
WIDTH = 32
NEGATIVE = ["lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit"]


def tiny_model(seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
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
    # Fresh LayerNorms have bias 0, so every output row has mean ~0 and A1111's mean restoration
    # divides float noise by float noise. Trained CLIP has real biases; give the tiny model some.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.5 * torch.randn_like(module.bias))
    return model


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def model() -> CLIPTextModel:
    return tiny_model()


@pytest.fixture
def enc(model: CLIPTextModel, tok: ClipTokenizer) -> PromptEncoder:
    return PromptEncoder(model, tok)


def chunk_ids(tok: ClipTokenizer, words: list[str]) -> list[int]:
    body = [i for w in words for i in tok.encode(w)]
    return [BOS, *body, *[EOS] * (75 - len(body)), EOS]


def raw_forward(model: CLIPTextModel, ids: list[list[int]], clip_skip: int = 1) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_hidden_states=True)
        if clip_skip == 1:
            return out.last_hidden_state
        return model.final_layer_norm(out.hidden_states[-clip_skip])


def test_shapes_and_plain_text(enc: PromptEncoder, model: CLIPTextModel, tok: ClipTokenizer) -> None:
    z = enc.encode_texts(["a photo of a cat"], clip_skip=1)
    assert z.shape == (1, 77, WIDTH)
    # All weights 1: "Original" leaves the plain forward unchanged (ratio of equal means is 1).
    expected = raw_forward(model, [chunk_ids(tok, ["a photo of a cat"])])
    assert torch.equal(z, expected)


def test_mean_restoration_formula(enc: PromptEncoder, model: CLIPTextModel, tok: ClipTokenizer) -> None:
    texts = ["(a:1.3) photo", "[cat] dog"]
    z = enc.encode_texts(texts, clip_skip=1)
    # Hand derivation: ids and multipliers per token, then A1111's formula over the whole batch.
    ids = [chunk_ids(tok, ["a", "photo"]), chunk_ids(tok, ["cat", "dog"])]
    mult = torch.ones(2, 77)
    mult[0, 1] = 1.3
    mult[1, 1] = 1 / 1.1
    raw = raw_forward(model, ids)
    weighted = raw * mult[..., None]
    expected = weighted * (raw.mean() / weighted.mean())
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)
    # The mean restoration spans the batch: encoding the first text alone differs.
    alone = enc.encode_texts(texts[:1], clip_skip=1)
    assert not torch.allclose(alone[0], z[0])
    # "No norm" multiplies only; "Ignore" and "None" leave the raw output.
    no_norm = enc.encode_texts(texts, clip_skip=1, emphasis="No norm")
    torch.testing.assert_close(no_norm, weighted, rtol=0, atol=1e-6)
    assert torch.equal(enc.encode_texts(texts, clip_skip=1, emphasis="Ignore"), raw)
    none = enc.encode_texts(["(a:1.3) photo"], clip_skip=1, emphasis="None")
    assert torch.equal(none, raw_forward(model, [chunk_ids(tok, ["(a:1.3) photo"])]))


def test_clip_skip(enc: PromptEncoder, model: CLIPTextModel, tok: ClipTokenizer) -> None:
    z2 = enc.encode_texts(["a photo of a cat"], clip_skip=2)
    ids = torch.tensor([chunk_ids(tok, ["a photo of a cat"])])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        expected = model.final_layer_norm(hidden[-2])
    assert torch.equal(z2, expected)
    assert not torch.allclose(z2, enc.encode_texts(["a photo of a cat"], clip_skip=1))
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        enc.encode_texts(["a"], clip_skip=3)
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        enc.encode_texts(["a"], clip_skip=0)


def test_negative_prompt_weights(enc: PromptEncoder) -> None:
    def weighted(w: float) -> str:
        return ", ".join(f"({t}:{w})" for t in NEGATIVE)

    results = {w: enc.encode_texts([weighted(w)], clip_skip=1) for w in (0.9, 1.0, 1.1)}
    assert not torch.equal(results[0.9], results[1.0])
    assert not torch.equal(results[1.1], results[1.0])
    assert not torch.equal(results[0.9], results[1.1])
    assert torch.equal(results[1.0], enc.encode_texts([", ".join(NEGATIVE)], clip_skip=1))


def test_full_width_comma_encodes_like_comma(enc: PromptEncoder) -> None:
    assert torch.equal(enc.encode_texts(["a，b"], clip_skip=1), enc.encode_texts(["a,b"], clip_skip=1))


def test_long_prompt_and_padding_chunks(enc: PromptEncoder, model: CLIPTextModel, tok: ClipTokenizer) -> None:
    z = enc.encode_texts(["cat " * 1000], clip_skip=1)
    assert z.shape == (1, 77 * 14, WIDTH)
    assert torch.isfinite(z).all()
    # A shorter prompt in the same call gets empty chunks: [BOS] + [EOS]*76 (weights 1: unchanged).
    both = enc.encode_texts(["dog", "cat " * 100], clip_skip=1)
    assert both.shape == (2, 154, WIDTH)
    empty = raw_forward(model, [[BOS] + [EOS] * 76])
    torch.testing.assert_close(both[0, 77:], empty[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        both[0, :77], raw_forward(model, [chunk_ids(tok, ["dog"])])[0], rtol=0, atol=1e-6
    )


def test_break_chunks_encode_separately(enc: PromptEncoder, model: CLIPTextModel, tok: ClipTokenizer) -> None:
    z = enc.encode_texts(["a photo BREAK a cat"], clip_skip=1)
    expected = raw_forward(model, [chunk_ids(tok, ["a photo"]), chunk_ids(tok, ["a cat"])])
    torch.testing.assert_close(z[0], torch.cat([expected[0], expected[1]]), rtol=0, atol=1e-6)


def test_encode_schedule_is_one_batch(enc: PromptEncoder) -> None:
    schedule = [(3, "a (cat:1.4)"), (20, "a dog")]
    sched = enc.encode_schedule(schedule, clip_skip=1)
    together = enc.encode_texts(["a (cat:1.4)", "a dog"], clip_skip=1)
    assert [s.end_at_step for s in sched] == [3, 20]
    assert torch.equal(sched[0].cond, together[0])
    assert torch.equal(sched[1].cond, together[1])
    assert isinstance(sched[0], ScheduledCond)


def test_encode_multicond_parts_separately(enc: PromptEncoder) -> None:
    parts = [([(20, "a (cat:1.4)")], 1.0), ([(20, "a dog")], 0.5)]
    mc = enc.encode_multicond(parts, clip_skip=1)
    assert isinstance(mc, MultiCond)
    assert [w for _, w in mc.parts] == [1.0, 0.5]
    assert torch.equal(mc.parts[0][0][0].cond, enc.encode_texts(["a (cat:1.4)"], clip_skip=1)[0])
    assert torch.equal(mc.parts[1][0][0].cond, enc.encode_texts(["a dog"], clip_skip=1)[0])


def test_cache_exact_and_keyed(model: CLIPTextModel, tok: ClipTokenizer) -> None:
    db = EmbeddingDatabase(tok, width=WIDTH)
    enc = PromptEncoder(model, tok, db, cache_size=3)
    schedule = [(20, "a (cat:1.2), zzneg")]
    first = enc.encode_schedule(schedule, clip_skip=1, model_key="m1")
    again = enc.encode_schedule(schedule, clip_skip=1, model_key="m1")
    assert again is first and enc.cache_hits == 1
    # A hit equals a fresh encoding by an encoder with no cache.
    fresh = PromptEncoder(model, tok, EmbeddingDatabase(tok, width=WIDTH), cache_size=0)
    assert torch.equal(fresh.encode_schedule(schedule, clip_skip=1)[0].cond, first[0].cond)

    misses = enc.cache_misses
    variants = [
        {"clip_skip": 2, "model_key": "m1"},
        {"clip_skip": 1, "model_key": "m2"},
        {"clip_skip": 1, "model_key": "m1", "emphasis": "No norm"},
        {"clip_skip": 1, "model_key": "m1", "comma_padding_backtrack": 5},
        {"clip_skip": 1, "model_key": "m1", "context": (20, None, False)},
    ]
    for kwargs in variants:
        enc.encode_schedule(schedule, **kwargs)  # type: ignore[arg-type]
    assert enc.cache_misses == misses + len(variants)
    assert enc.encode_schedule([(19, "a (cat:1.2), zzneg")], clip_skip=1, model_key="m1") is not first

    # A new embedding whose name is in the prompt must change the result and miss the cache.
    before = enc.encode_schedule(schedule, clip_skip=1)
    db.add(Embedding("zzneg", torch.randn(2, WIDTH)))
    after = enc.encode_schedule(schedule, clip_skip=1)
    assert after is not before
    assert not torch.equal(after[0].cond, before[0].cond)

    # LRU bound: size 3, the oldest entry is evicted.
    enc = PromptEncoder(model, tok, db, cache_size=3)
    for text in ["p1", "p2", "p3", "p4"]:
        enc.encode_schedule([(20, text)], clip_skip=1)
    hits = enc.cache_hits
    enc.encode_schedule([(20, "p4")], clip_skip=1)
    assert enc.cache_hits == hits + 1
    enc.encode_schedule([(20, "p1")], clip_skip=1)
    assert enc.cache_hits == hits + 1  # evicted, so a miss


def test_embeddings_used_in_the_order_a1111s_encoder_meets_them(
    model: CLIPTextModel, tok: ClipTokenizer
) -> None:
    # A1111's encoder walks chunk by chunk across the call's texts: the second text's first chunk
    # comes before the first text's second chunk.
    db = EmbeddingDatabase(tok, width=WIDTH)
    db.add(Embedding("zzlate", torch.randn(1, WIDTH), sha256="1" * 64))
    db.add(Embedding("zzearly", torch.randn(1, WIDTH), sha256="2" * 64))
    enc = PromptEncoder(model, tok, db)
    late = " ".join(["w"] * 80) + " zzlate"
    assert [len(enc.tokenize(text).chunks) for text in (late, "zzearly b")] == [2, 1]
    assert list(enc.embeddings_used([late, "zzearly b"])) == ["zzearly", "zzlate"]
    assert list(enc.embeddings_used([late])) == ["zzlate"]


def test_token_report_and_embeddings_used(model: CLIPTextModel, tok: ClipTokenizer) -> None:
    db = EmbeddingDatabase(tok, width=WIDTH)
    db.add(Embedding("zzneg", torch.randn(2, WIDTH), sha256="ab" * 32))
    enc = PromptEncoder(model, tok, db)
    assert enc.embeddings_used(["a zzneg", "b"]) == {"zzneg": "ab" * 6}
    report = enc.token_report("(a:1.5) zzneg")
    assert "tokens: 3/75" in report
    assert "<zzneg>" in report

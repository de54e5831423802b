"""SDXLPromptEncoder on tiny in-memory CLIP-L and bigG towers, against hand-built token ids.

Every expected value runs the towers directly on ids built here from A1111's rules (CLIP-L pads
with its end token, bigG with 0 after the first end token; 75-token chunks; BREAK), then applies
A1111's emphasis formula per encoder. diffusers' own SDXL prompt encoding is a second peer for
plain one-chunk prompts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from voidprompt.conditioning import MultiCond
from voidprompt.errors import InvalidRequestError, PromptError
from voidprompt.models.tokenizer import ClipTokenizer, load_clip_tokenizer
from voidprompt.prompts.embeddings import EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder
from voidprompt.prompts.encode_sdxl import SDXLPromptEncoder
from voidprompt.prompts.schedule import prompt_schedules
from voidprompt.testing.hf_tokenizer import write_hf_clip_tokenizer_files

BOS, EOS = 49406, 49407
L_WIDTH, G_WIDTH, PROJ = 32, 48, 24
L_LAYERS, G_LAYERS = 3, 3


def _perturb_norms(model: torch.nn.Module) -> None:
    # Fresh LayerNorms have bias 0, so every row has mean ~0 and A1111's mean restoration divides
    # float noise by float noise; trained CLIP towers have real biases.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.copy_(0.5 * torch.randn_like(module.bias))


def tiny_l() -> CLIPTextModel:
    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=L_WIDTH,
        intermediate_size=64,
        num_hidden_layers=L_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    model = CLIPTextModel(config).eval()
    _perturb_norms(model)
    return model


def tiny_g() -> CLIPTextModelWithProjection:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=G_WIDTH,
        intermediate_size=96,
        num_hidden_layers=G_LAYERS,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=PROJ,
    )
    model = CLIPTextModelWithProjection(config).eval()
    _perturb_norms(model)
    return model


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def model_l() -> CLIPTextModel:
    return tiny_l()


@pytest.fixture(scope="module")
def model_g() -> CLIPTextModelWithProjection:
    return tiny_g()


@pytest.fixture
def enc(
    model_l: CLIPTextModel, model_g: CLIPTextModelWithProjection, tok: ClipTokenizer
) -> SDXLPromptEncoder:
    return SDXLPromptEncoder(model_l, model_g, tok)


def body(tok: ClipTokenizer, text: str) -> list[int]:
    return tok.encode(text)


def l_ids(ids: list[int]) -> list[int]:
    return [BOS, *ids, *[EOS] * (75 - len(ids)), EOS]


def g_ids(ids: list[int]) -> list[int]:
    return [BOS, *ids, EOS, *[0] * (75 - len(ids))]


def run_l(model: CLIPTextModel, rows: list[list[int]], layer: int = L_LAYERS - 1) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows), output_hidden_states=True).hidden_states[layer]


def run_g(model: CLIPTextModelWithProjection, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(rows)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        # The pooled vector by hand: final-LayerNorm state at the first end token, projected.
        end = [row.index(EOS) for row in rows]
        pooled = (
            out.last_hidden_state[torch.arange(len(rows)), torch.tensor(end)] @ model.text_projection.weight.T
        )
    return out.hidden_states[-2], pooled


def original_emphasis(z: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    weighted = z * mult[..., None]
    return weighted * (z.mean() / weighted.mean())


def test_plain_prompt_by_hand(enc: SDXLPromptEncoder, model_l: Any, model_g: Any, tok: ClipTokenizer) -> None:
    ids = body(tok, "a photo of a cat")
    (sched,) = enc.encode_schedule([(20, "a photo of a cat")], clip_skip=1)
    assert sched.cond.shape == (77, L_WIDTH + G_WIDTH)
    assert sched.pooled is not None and sched.pooled.shape == (PROJ,)
    zg, pooled = run_g(model_g, [g_ids(ids)])
    expected = torch.cat([run_l(model_l, [l_ids(ids)])[0], zg[0]], dim=1)
    assert torch.equal(sched.cond, expected)
    torch.testing.assert_close(sched.pooled, pooled[0], rtol=0, atol=1e-6)
    # transformers' own pooled output (first end token) agrees with open_clip's argmax rule here.
    with torch.no_grad():
        text_embeds = model_g(input_ids=torch.tensor([g_ids(ids)])).text_embeds[0]
    torch.testing.assert_close(sched.pooled, text_embeds, rtol=0, atol=1e-6)


def test_bigg_pads_with_zero_and_clip_l_with_end(model_l: Any, model_g: Any, tok: ClipTokenizer) -> None:
    enc = SDXLPromptEncoder(model_l, model_g, tok)
    ids = body(tok, "a cat")
    cond, _ = enc.encode_texts(["a cat"], clip_skip=1)
    # The padding is visible: bigG fed CLIP-L's padding (or CLIP-L fed bigG's) gives other numbers.
    g_wrong, _ = run_g(model_g, [l_ids(ids)])
    l_wrong = run_l(model_l, [g_ids(ids)])
    assert not torch.allclose(cond[0, :, L_WIDTH:], g_wrong[0])
    assert not torch.allclose(cond[0, :, :L_WIDTH], l_wrong[0])
    g_right, _ = run_g(model_g, [g_ids(ids)])
    assert torch.equal(cond[0, :, L_WIDTH:], g_right[0])


def test_full_chunk_has_no_zero_padding(enc: SDXLPromptEncoder, model_g: Any, tok: ClipTokenizer) -> None:
    text = "cat " * 75
    ids = body(tok, text)
    assert len(ids) == 75
    cond, pooled = enc.encode_texts([text], clip_skip=1)
    assert cond.shape == (1, 77, L_WIDTH + G_WIDTH)
    row = [BOS, *ids, EOS]
    zg, want = run_g(model_g, [row])
    assert torch.equal(cond[0, :, L_WIDTH:], zg[0])
    torch.testing.assert_close(pooled[0], want[0], rtol=0, atol=1e-6)


def test_pooled_comes_from_first_chunk(
    enc: SDXLPromptEncoder, model_l: Any, model_g: Any, tok: ClipTokenizer
) -> None:
    cond, pooled = enc.encode_texts(["a photo BREAK a cat"], clip_skip=1)
    assert cond.shape == (1, 154, L_WIDTH + G_WIDTH)
    first, second = body(tok, "a photo"), body(tok, "a cat")
    zg, pools = run_g(model_g, [g_ids(first), g_ids(second)])
    zl = run_l(model_l, [l_ids(first), l_ids(second)])
    torch.testing.assert_close(pooled[0], pools[0], rtol=0, atol=1e-6)
    assert not torch.allclose(pooled[0], pools[1])
    expected = torch.cat([torch.cat([zl[0], zl[1]]), torch.cat([zg[0], zg[1]])], dim=1)
    torch.testing.assert_close(cond[0], expected, rtol=0, atol=1e-6)


def test_emphasis_and_mean_restoration_per_encoder(
    enc: SDXLPromptEncoder, model_l: Any, model_g: Any, tok: ClipTokenizer
) -> None:
    texts = ["(a:1.3) photo", "[cat] dog"]
    cond, pooled = enc.encode_texts(texts, clip_skip=1)
    bodies = [body(tok, "a photo"), body(tok, "cat dog")]
    mult = torch.ones(2, 77)
    mult[0, 1] = 1.3
    mult[1, 1] = 1 / 1.1
    zl = run_l(model_l, [l_ids(b) for b in bodies])
    zg, pools = run_g(model_g, [g_ids(b) for b in bodies])
    torch.testing.assert_close(cond[..., :L_WIDTH], original_emphasis(zl, mult), rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[..., L_WIDTH:], original_emphasis(zg, mult), rtol=0, atol=1e-6)
    # One mean over both encoders' channels would give other numbers.
    joint = original_emphasis(torch.cat([zl, zg], dim=2), mult)
    assert not torch.allclose(cond, joint, rtol=0, atol=1e-5)
    # Emphasis never reaches the pooled vector.
    torch.testing.assert_close(pooled, pools, rtol=0, atol=1e-6)
    no_norm, _ = enc.encode_texts(texts, clip_skip=1, emphasis="No norm")
    torch.testing.assert_close(no_norm[..., L_WIDTH:], zg * mult[..., None], rtol=0, atol=1e-6)


def test_clip_skip_rule(model_l: Any, model_g: Any, tok: ClipTokenizer) -> None:
    ids = l_ids(body(tok, "a photo of a cat"))
    enc = SDXLPromptEncoder(model_l, model_g, tok)
    default = enc.encode_texts(["a photo of a cat"], clip_skip=1)[0]
    # Off by default: Clip skip has no effect at all.
    for skip in (2, 3, 7):
        assert torch.equal(enc.encode_texts(["a photo of a cat"], clip_skip=skip)[0], default)
    # sdxl_clip_l_skip: CLIP-L only, hidden_states[-N] without the final LayerNorm.
    assert torch.equal(enc.encode_texts(["a photo of a cat"], clip_skip=2, sdxl_clip_l_skip=True)[0], default)
    skip1 = enc.encode_texts(["a photo of a cat"], clip_skip=1, sdxl_clip_l_skip=True)[0]
    assert torch.equal(skip1[0, :, :L_WIDTH], run_l(model_l, [ids], layer=-1)[0])
    with torch.no_grad():
        last = model_l(input_ids=torch.tensor([ids])).last_hidden_state[0]
    assert not torch.allclose(skip1[0, :, :L_WIDTH], last)
    assert torch.equal(skip1[0, :, L_WIDTH:], default[0, :, L_WIDTH:])
    skip3 = SDXLPromptEncoder(model_l, model_g, tok, sdxl_clip_l_skip=True).encode_texts(
        ["a photo of a cat"], clip_skip=3
    )[0]
    assert torch.equal(skip3[0, :, :L_WIDTH], run_l(model_l, [ids], layer=-3)[0])
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        enc.encode_texts(["a"], clip_skip=4, sdxl_clip_l_skip=True)
    with pytest.raises(InvalidRequestError, match="clip_skip"):
        enc.encode_texts(["a"], clip_skip=0)


def test_empty_negative_is_zeroed(enc: SDXLPromptEncoder) -> None:
    def negative(prompt: str) -> Any:
        return enc.encode_schedule(prompt_schedules(prompt, 20), clip_skip=1, negative=True)

    (empty,) = negative("")
    assert empty.cond.shape == (77, L_WIDTH + G_WIDTH)
    assert empty.pooled is not None
    assert not empty.cond.any() and not empty.pooled.any()
    (space,) = negative(" ")
    assert space.cond.abs().sum() > 0 and space.pooled is not None and space.pooled.abs().sum() > 0
    # "[:x:0.5]" is one prompt whose schedule texts ["", "x"] are one batch: not all "", not zeroed.
    assert prompt_schedules("[:x:0.5]", 20) == [(10, ""), (20, "x")]
    edit = negative("[:x:0.5]")
    assert all(e.cond.abs().sum() > 0 for e in edit)
    plain_empty = enc.encode_schedule([(10, "")], clip_skip=1)
    assert torch.equal(edit[0].cond, enc.encode_texts(["", "x"], clip_skip=1)[0][0])
    assert plain_empty[0].cond.abs().sum() > 0  # a positive "" is never zeroed
    # A batch of two negative prompts: each is its own schedule.
    batch = [negative(p) for p in ["", "foo"]]
    assert not batch[0][0].cond.any()
    assert batch[1][0].cond.abs().sum() > 0


def test_chunk_count_mismatch_is_an_error(enc: SDXLPromptEncoder) -> None:
    # With a "<" in the text CLIP-L keeps "&amp;" (3 tokens) where bigG reads "&" (1 token).
    text = "<x> " + "&amp; " * 30
    assert len(enc.tokenize(text).chunks) == 2
    with pytest.raises(PromptError, match="chunk"):
        enc.encode_texts([text], clip_skip=1)
    # Same counts in both: a long prompt works and hstacks chunks.
    cond, _ = enc.encode_texts(["cat " * 100], clip_skip=1)
    assert cond.shape == (1, 154, L_WIDTH + G_WIDTH)


def test_refiner_has_bigg_alone(model_g: Any, tok: ClipTokenizer) -> None:
    enc = SDXLPromptEncoder(None, model_g, tok)
    assert enc.width == G_WIDTH
    (entry,) = enc.encode_schedule([(20, "a cat")], clip_skip=2)
    zg, pooled = run_g(model_g, [g_ids(body(tok, "a cat"))])
    assert torch.equal(entry.cond, zg[0])
    assert entry.pooled is not None
    torch.testing.assert_close(entry.pooled, pooled[0], rtol=0, atol=1e-6)


def test_schedule_multicond_and_cache(model_l: Any, model_g: Any, tok: ClipTokenizer) -> None:
    enc = SDXLPromptEncoder(model_l, model_g, tok, cache_size=4)
    schedule = [(3, "a (cat:1.4)"), (20, "a dog")]
    sched = enc.encode_schedule(schedule, clip_skip=1)
    cond, pooled = enc.encode_texts(["a (cat:1.4)", "a dog"], clip_skip=1)
    assert [e.end_at_step for e in sched] == [3, 20]
    for i, entry in enumerate(sched):
        assert torch.equal(entry.cond, cond[i])
        assert entry.pooled is not None and torch.equal(entry.pooled, pooled[i])
    assert enc.encode_schedule(schedule, clip_skip=1) is sched and enc.cache_hits == 1
    misses = enc.cache_misses
    enc.encode_schedule(schedule, clip_skip=1, negative=True)
    enc.encode_schedule(schedule, clip_skip=1, sdxl_clip_l_skip=True)
    enc.encode_schedule(schedule, clip_skip=1, model_key="lora")
    assert enc.cache_misses == misses + 3
    mc = enc.encode_multicond([([(20, "a dog")], 1.0), ([(20, "a cat")], 0.5)], clip_skip=1)
    assert isinstance(mc, MultiCond) and [w for _, w in mc.parts] == [1.0, 0.5]
    assert torch.equal(mc.parts[0][0][0].cond, enc.encode_texts(["a dog"], clip_skip=1)[0][0])


def test_token_report_counts_clip_l(enc: SDXLPromptEncoder) -> None:
    # CLIP-L is A1111's first embedder: its tokens are the counter's.
    assert "tokens: 7/75" in enc.token_report("<x> &amp; y")
    assert enc.embeddings_used(["a cat"]) == {}


def test_rejects_a_tower_without_projection(model_l: Any, tok: ClipTokenizer) -> None:
    with pytest.raises(PromptError, match="text_projection"):
        SDXLPromptEncoder(model_l, model_l, tok)


def test_diffusers_peer_plain_prompt(model_l: Any, model_g: Any, tok: ClipTokenizer, tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from transformers import CLIPTokenizer

    folder = write_hf_clip_tokenizer_files(tmp_path / "tok")
    tok_1 = CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, pad_token="<|endoftext|>", model_max_length=77
    )
    # Its second tokenizer must pad with "!" (id 0), bigG's padding.
    tok_2 = CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, pad_token="!", model_max_length=77
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=model_l,
        text_encoder_2=model_g,
        tokenizer=tok_1,
        tokenizer_2=tok_2,
        unet=None,
        scheduler=None,
    )
    prompt, negative = "a photo of a cat, (masterpiece)", "lowres, bad hands"
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompt, device=torch.device("cpu"), num_images_per_prompt=1, negative_prompt=negative, clip_skip=None
    )
    enc = SDXLPromptEncoder(model_l, model_g, tok)
    # Weights all 1 for diffusers: A1111's emphasis is off in this comparison.
    (ours,) = enc.encode_schedule([(20, prompt)], clip_skip=1, emphasis="None")
    (ours_neg,) = enc.encode_schedule([(20, negative)], clip_skip=1, emphasis="None", negative=True)
    torch.testing.assert_close(ours.cond, embeds[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_neg.cond, neg_embeds[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_neg.pooled, neg_pooled[0], rtol=0, atol=1e-5)


def _with_rows(model: Any, rows: dict[int, torch.Tensor]) -> Any:
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for token_id, vector in rows.items():
            clone.get_input_embeddings().weight[token_id] = vector
    return clone


def test_sdxl_textual_inversion(model_l: Any, model_g: Any, tok: ClipTokenizer, tmp_path: Path) -> None:
    torch.manual_seed(5)
    clip_l, clip_g = torch.randn(2, L_WIDTH), torch.randn(2, G_WIDTH)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "zzemb.safetensors"))
    save_file({"emb_params": torch.randn(1, L_WIDTH)}, str(tmp_path / "zzsd.safetensors"))
    save_file({"clip_l": clip_l, "clip_g": clip_g[:1]}, str(tmp_path / "zzodd.safetensors"))
    db_l = EmbeddingDatabase(tok, width=L_WIDTH, sdxl_part="clip_l")
    db_g = EmbeddingDatabase(tok, width=G_WIDTH, sdxl_part="clip_g")
    for db in (db_l, db_g):
        assert [e.name for e in db.load_folder(tmp_path)] == ["zzemb"]
        assert set(db.skipped) == {"zzsd", "zzodd"}
    assert torch.equal(db_l.embeddings["zzemb"].vectors, clip_l)
    assert torch.equal(db_g.embeddings["zzemb"].vectors, clip_g)

    enc = SDXLPromptEncoder(model_l, model_g, tok, db_l, embeddings_g=db_g)
    cond, pooled = enc.encode_texts(["a zzemb cat"], clip_skip=1)
    # By hand: two spare token ids whose embedding rows hold each encoder's own vectors.
    spare = [49000, 49001]
    ids = [*body(tok, "a"), *spare, *body(tok, "cat")]
    zl = run_l(_with_rows(model_l, dict(zip(spare, clip_l, strict=True))), [l_ids(ids)])
    zg, want_pooled = run_g(_with_rows(model_g, dict(zip(spare, clip_g, strict=True))), [g_ids(ids)])
    torch.testing.assert_close(cond[0], torch.cat([zl[0], zg[0]], dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=1e-6)
    # Databases set after construction count, and change the cache key.
    late = SDXLPromptEncoder(model_l, model_g, tok)
    (plain,) = late.encode_schedule([(20, "a zzemb cat")], clip_skip=1)
    late.embeddings, late.embeddings_g = db_l, db_g
    (with_ti,) = late.encode_schedule([(20, "a zzemb cat")], clip_skip=1)
    assert torch.equal(with_ti.cond, cond[0]) and not torch.allclose(plain.cond, cond[0])
    assert enc.embeddings_used(["a zzemb cat"]) == {"zzemb": db_l.embeddings["zzemb"].shorthash}
    assert len(db_l.embeddings["zzemb"].shorthash) == 12
    with pytest.raises(PromptError, match="not an SDXL embedding"):
        enc.encode_texts(["zzsd"], clip_skip=1)
    with pytest.raises(PromptError, match="same count"):
        enc.encode_texts(["zzodd"], clip_skip=1)
    with pytest.raises(PromptError, match="width"):
        SDXLPromptEncoder(model_l, model_g, tok, db_g)
    with pytest.raises(PromptError, match="clip_x"):
        EmbeddingDatabase(tok, width=L_WIDTH, sdxl_part="clip_x")


def test_sd1_encoder_takes_negative_and_ignores_it(model_l: Any, tok: ClipTokenizer) -> None:
    sd1 = PromptEncoder(model_l, tok)
    (empty,) = sd1.encode_schedule([(20, "")], clip_skip=1, negative=True)
    assert torch.equal(empty.cond, sd1.encode_texts([""], clip_skip=1)[0])
    assert empty.cond.abs().sum() > 0 and empty.pooled is None


def test_shorter_text_gets_empty_chunks_padded_per_encoder(
    enc: SDXLPromptEncoder, model_l: Any, model_g: Any, tok: ClipTokenizer
) -> None:
    cond, _ = enc.encode_texts(["dog", "cat " * 100], clip_skip=1)
    assert cond.shape == (2, 154, L_WIDTH + G_WIDTH)
    # The empty chunk: [BOS] + [EOS]*76 for CLIP-L, [BOS, EOS] + [0]*75 for bigG.
    torch.testing.assert_close(cond[0, 77:, :L_WIDTH], run_l(model_l, [l_ids([])])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[0, 77:, L_WIDTH:], run_g(model_g, [g_ids([])])[0][0], rtol=0, atol=1e-6)

"""The miniature model's trainer: caption tokens, the Clip-skip-2 context, a tiny resumable run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from voidprompt.demo.train import (
    FINAL_LN_BIAS_MEAN,
    MINIATURE_ARCH,
    CaptionBatcher,
    TrainConfig,
    TrainError,
    blind_padding,
    encode_tokens,
    fresh_modules,
    text_condition,
    train,
)
from voidprompt.models.tokenizer import load_clip_tokenizer


def test_encode_tokens_equals_tokenizing_the_joined_caption() -> None:
    tok = load_clip_tokenizer()
    tags = ["red circle", "jpeg artifacts", "2shapes", "striped background"]
    comma = tok.encode(",")[0]
    ids = encode_tokens([tok.encode(t) for t in tags], tok.bos_id, tok.eos_id, comma)
    # Oracle: the tokenizer on the whole caption, padded with EOS as SD1 does.
    whole = [tok.bos_id, *tok.encode(", ".join(tags)), tok.eos_id]
    assert len(ids) == 77
    assert ids[: len(whole)] == whole
    assert set(ids[len(whole):]) == {tok.eos_id}
    assert encode_tokens([], tok.bos_id, tok.eos_id, comma) == [tok.bos_id] + [tok.eos_id] * 76


def test_text_condition_is_a1111_clip_skip_2() -> None:
    """The trainer's context equals what PromptEncoder (the inference path) gives at Clip skip 2."""
    from voidprompt.prompts.encode import PromptEncoder

    _, _, te = fresh_modules(seed=3)
    te.eval()
    tok = load_clip_tokenizer()
    text = "blue square, white background, solo"
    ids = torch.tensor([[tok.bos_id, *tok.encode(text), tok.eos_id] + [tok.eos_id] * (77 - 9)])
    with torch.no_grad():
        ours = text_condition(te, ids)
    theirs = PromptEncoder(te, tok).encode_texts([text], clip_skip=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_final_layer_norm_bias_keeps_the_mean_away_from_zero() -> None:
    _, _, te = fresh_modules(seed=0)
    inner = getattr(te, "text_model", te)
    bias = inner.final_layer_norm.bias
    assert not bias.requires_grad
    assert abs(float(bias.mean()) - FINAL_LN_BIAS_MEAN) < 0.05
    tok = load_clip_tokenizer()
    ids = torch.tensor([[tok.bos_id, *tok.encode(""), tok.eos_id] + [tok.eos_id] * 75])
    with torch.no_grad():
        z = text_condition(te, ids)
    # A1111's mean restoration divides by this mean.
    assert float(z.mean()) > 0.3


def test_arch_is_sd1_layout_and_narrow() -> None:
    unet, vae, te = fresh_modules(seed=0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 2.5e6 < n(unet) < 5e6
    assert te.config.vocab_size == 49408 and te.config.max_position_embeddings == 77
    assert te.config.hidden_size == 64 and te.config.hidden_act == "quick_gelu"
    assert len(vae.config.block_out_channels) == 4 and vae.config.latent_channels == 4  # f = 8
    assert MINIATURE_ARCH.unet.context_dim == te.config.hidden_size


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Path]:
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        out_dir=out, n_images=8, vae_steps=2, vae_batch=4, diffusion_steps=2, batch_size=4, warmup_steps=1,
        decoder_steps=0, checkpoint_minutes=1000.0,
    )
    return config, train(config, log_fn=lambda _: None)


def test_tiny_run_exports_a_loadable_fp16_sd1_file(tiny_run: tuple[TrainConfig, Path]) -> None:
    from safetensors import safe_open

    from voidprompt.models.detect import ModelFamily
    from voidprompt.models.load import load_model

    _, path = tiny_run
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    arch = json.loads(meta["voidprompt.arch"])
    assert arch["unet_heads"] == 4 and arch["clip_head_dim"] == 16
    assert arch["scaling_factor"] > 0
    assert json.loads(meta["voidprompt.training"])["phase"] == "done"
    assert dtypes == {"F16", "F32", "I64"}  # weights fp16; alphas_cumprod fp32; position_ids int64
    c = load_model(path)
    assert c.family is ModelFamily.SD1
    # Every key is consumed (alphas_cumprod and position_ids count as read).
    assert c.report.consumed == len(keys)
    assert not c.report.unused and not c.report.missing and not c.report.ignored
    assert c.scaling_factor == pytest.approx(arch["scaling_factor"])
    # The run ends by fitting its own cheap preview map into the file, from as many pictures as it had.
    from voidprompt.demo.preview_fit import fit_preview_map

    assert c.latent_rgb is not None and c.latent_rgb == fit_preview_map(c, n=tiny_run[0].n_images)


def test_resume_refuses_a_fresh_start_over_a_run_and_continues_it(tiny_run: tuple[TrainConfig, Path]) -> None:
    config, _ = tiny_run
    with pytest.raises(TrainError, match="--resume"):
        train(config, log_fn=lambda _: None)
    lines: list[str] = []
    longer = TrainConfig(**{**config.__dict__, "diffusion_steps": 3})
    train(longer, resume=True, log_fn=lines.append)
    assert any("resumed" in s and "phase done" in s for s in lines)
    assert any(s.startswith("diffusion 3/3") or "step 3" in s for s in lines)
    with pytest.raises(TrainError, match="seed"):
        train(TrainConfig(**{**config.__dict__, "seed": 1}), resume=True, log_fn=lambda _: None)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow  # about 10 s of training steps
def test_decoder_phase_changes_only_the_decoder_and_is_independent_of_the_diffusion_phase(
    tmp_path: Path,
) -> None:
    """Phase 4 may run beside phase 3 on a copy of the run: the merged result is bit-identical to one
    sequential run, and the fine-tune touches no key outside the VAE decoder."""
    import shutil

    quiet = lambda _: None  # noqa: E731
    # threads=1: the decoder phase runs in line (beside, in a second process, is the slow test below).
    base = dict(n_images=8, vae_steps=2, vae_batch=4, batch_size=4, warmup_steps=1, decoder_batch=4,
                checkpoint_minutes=1000.0, partial_captions_from=1, threads=1)
    sequential = train(TrainConfig(out_dir=tmp_path / "seq", diffusion_steps=2, decoder_steps=2, **base),
                       log_fn=quiet)  # type: ignore[arg-type]

    # Phases 1-2 only, then two copies: diffusion in one, the decoder in the other.
    first = tmp_path / "a"
    train(TrainConfig(out_dir=first, diffusion_steps=0, decoder_steps=0, **base), log_fn=quiet)  # type: ignore[arg-type]
    no_decoder = _tensors(first / "model.safetensors")
    shutil.copytree(first, tmp_path / "b")
    train(TrainConfig(out_dir=tmp_path / "b", diffusion_steps=0, decoder_steps=2, **base), resume=True,
          log_fn=quiet)  # type: ignore[arg-type]
    train(TrainConfig(out_dir=first, diffusion_steps=2, decoder_steps=0, **base), resume=True, log_fn=quiet)  # type: ignore[arg-type]
    shutil.copy(tmp_path / "b" / "decoder.pt", first / "decoder.pt")
    merged = train(TrainConfig(out_dir=first, diffusion_steps=2, decoder_steps=2, **base), resume=True,
                   log_fn=quiet)  # type: ignore[arg-type]

    seq, mer = _tensors(sequential), _tensors(merged)
    decoder_only = _tensors(tmp_path / "b" / "model.safetensors")
    assert seq.keys() == mer.keys()
    assert all(torch.equal(seq[k], mer[k]) for k in seq)
    changed = {k for k in no_decoder if not torch.equal(no_decoder[k], decoder_only[k])}
    assert changed and all(k.startswith(("first_stage_model.decoder.", "first_stage_model.post_quant_conv."))
                           for k in changed)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in changed)


@pytest.mark.slow  # a second process; the phases' independence is checked quick in one process above
def test_two_cores_run_the_decoder_phase_beside_and_give_the_one_core_weights(tmp_path: Path) -> None:
    base = dict(n_images=8, vae_steps=2, vae_batch=4, batch_size=4, warmup_steps=1, decoder_batch=4,
                diffusion_steps=2, checkpoint_minutes=1000.0)

    def run(name: str, threads: int, decoder_steps: int, log: list[str]) -> dict[str, torch.Tensor]:
        config = TrainConfig(out_dir=tmp_path / name, threads=threads, decoder_steps=decoder_steps,
                             **base)  # type: ignore[arg-type]
        return _tensors(train(config, log_fn=log.append))

    lines: list[str] = []
    one, two, without = run("one", 1, 2, []), run("two", 2, 2, lines), run("none", 1, 0, [])
    assert any("decoder phase running beside" in line for line in lines)
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # ... and that phase did change the decoder.
    assert any(not torch.equal(one[k], without[k]) for k in one if k.startswith("first_stage_model.decoder."))


def test_a_run_at_another_picture_size_makes_that_the_models_native_size(tmp_path: Path) -> None:
    """``image_size`` is stored as the file's ``vae_sample_size`` (latents: side / 8), and the demo's
    measurements generate and read pictures at it."""
    from voidprompt.demo.generate import load_engine, native_size
    from voidprompt.demo.measure import count_ratio, generate_images

    config = TrainConfig(
        out_dir=tmp_path, image_size=48, n_images=4, vae_steps=1, vae_batch=4, diffusion_steps=1,
        batch_size=4, warmup_steps=1, decoder_steps=0, checkpoint_minutes=1000.0,
    )
    path = train(config, log_fn=lambda _: None)
    assert torch.load(tmp_path / "latents.pt", weights_only=True)["mean"].shape == (4, 4, 6, 6)
    engine = load_engine(path, threads=1)
    constants = engine.components.arch.constants
    assert (constants.vae_sample_size, constants.unet_sample_size) == (48, 6)
    assert native_size(engine.components) == 48
    pictures = generate_images(engine, "red circle", "", 2, seed=1, steps=2)
    assert [picture.size for picture in pictures] == [(48, 48)] * 2
    assert count_ratio(engine, 1, seed=1)["side"] == 48.0
    with pytest.raises(TrainError, match="--image-size 48"):
        train(TrainConfig(**{**config.__dict__, "image_size": 64}), resume=True, log_fn=lambda _: None)


@pytest.mark.slow  # about 10 s of training steps
def test_half_size_steps_learn_from_the_same_scenes_at_half_the_side_then_switch(tmp_path: Path) -> None:
    base = dict(n_images=8, vae_steps=2, vae_batch=4, batch_size=4, warmup_steps=1, decoder_steps=0,
                checkpoint_minutes=1000.0, padding_blind_from=None, foreign_tags_from=None)

    def run(name: str, steps: int, until: int) -> dict[str, torch.Tensor]:
        config = TrainConfig(out_dir=tmp_path / name, diffusion_steps=steps, half_size_until=until,
                             **base)  # type: ignore[arg-type]
        return _tensors(train(config, log_fn=lambda _: None))

    # Two steps, both half-size in either run: the same weights; a third step native in one run only.
    two_a, two_b = run("a", 2, 2), run("b", 2, 3)
    assert all(torch.equal(two_a[k], two_b[k]) for k in two_a)
    three_a, three_b = run("c", 3, 2), run("d", 3, 3)
    unet = [k for k in three_a if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(three_a[k], three_b[k]) for k in unet)

    native = torch.load(tmp_path / "c" / "images.pt", weights_only=True)
    half = torch.load(tmp_path / "c" / "images-half.pt", weights_only=True)
    assert half["captions"] == native["captions"]
    assert half["images"].shape == (8, 3, 32, 32) and native["images"].shape == (8, 3, 64, 64)
    # The same scenes: each half picture is close to its own native picture shrunk 2x, far from others'.
    shrunk = torch.nn.functional.avg_pool2d(native["images"].float(), 2)
    error = (shrunk[:, None] - half["images"].float()[None]).abs().mean(dim=(2, 3, 4))  # (native, half)
    assert torch.equal(error.argmin(dim=0), torch.arange(8))
    assert torch.load(tmp_path / "c" / "latents-half.pt", weights_only=True)["mean"].shape == (8, 4, 4, 4)
    assert torch.load(tmp_path / "c" / "latents.pt", weights_only=True)["mean"].shape == (8, 4, 8, 8)
    from voidprompt.demo.generate import native_size
    from voidprompt.models.load import load_model

    assert native_size(load_model(tmp_path / "c" / "model.safetensors")) == 64  # the export is native


def test_half_size_needs_a_side_that_halves_into_whole_latents(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="multiple of 16"):
        TrainConfig(out_dir=tmp_path, image_size=72, half_size_until=10)
    with pytest.raises(TrainError, match="upright"):
        TrainConfig(out_dir=tmp_path, image_size=128, half_size_until=10, upright_from=5)
    assert TrainConfig(out_dir=tmp_path, image_size=128, half_size_until=10).half_size_until == 10


def test_device_is_cpu_or_cuda_and_a_missing_gpu_is_named(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="'cpu', 'cuda' or 'cuda:N'"):
        TrainConfig(out_dir=tmp_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="no CUDA device"):
            train(TrainConfig(out_dir=tmp_path, device="cuda"), log_fn=lambda _: None)
        assert not (tmp_path / "state.pt").exists()  # refused before anything was written


def test_state_files_hold_cpu_tensors_whatever_the_device(tiny_run: tuple[TrainConfig, Path]) -> None:
    """So a run started on a GPU resumes on a CPU: every tensor in state.pt is a CPU tensor."""
    config, _ = tiny_run
    saved = torch.load(config.out_dir / "state.pt", weights_only=True)

    def devices(obj: object) -> set[str]:
        if isinstance(obj, torch.Tensor):
            return {obj.device.type}
        if isinstance(obj, dict):
            return set().union(*(devices(v) for v in obj.values()))
        if isinstance(obj, list | tuple):
            return set().union(*(devices(v) for v in obj))
        return set()

    assert devices(saved) == {"cpu"}
    assert isinstance(saved["opt"]["state"], dict) and saved["opt"]["state"]  # optimiser moments kept


def test_min_snr_gamma_must_be_positive_or_none(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="min_snr_gamma"):
        TrainConfig(out_dir=tmp_path, min_snr_gamma=0.0)
    assert TrainConfig(out_dir=tmp_path, min_snr_gamma=None).min_snr_gamma is None


def test_tag_keep_prob_is_validated(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="tag_keep_prob"):
        TrainConfig(out_dir=tmp_path, tag_keep_prob=0.0)


def test_diffusion_lr_warms_up_holds_then_falls_linearly_to_zero(tmp_path: Path) -> None:
    config = TrainConfig(out_dir=tmp_path, lr=1e-3, warmup_steps=10, diffusion_steps=200, lr_decay_from=100)
    # Warm-up: step s (0-based) uses (s + 1) / 10 of the lr.
    assert config.diffusion_lr(0) == pytest.approx(1e-4)
    assert config.diffusion_lr(4) == pytest.approx(5e-4)
    # Stable up to the decay start.
    assert config.diffusion_lr(50) == pytest.approx(1e-3)
    assert config.diffusion_lr(99) == pytest.approx(1e-3)
    # Linear decay over the last 100 steps: (200 - s) / 100 of the lr, never exactly 0 on a trained step.
    assert config.diffusion_lr(100) == pytest.approx(1e-3)
    assert config.diffusion_lr(150) == pytest.approx(5e-4)
    assert config.diffusion_lr(199) == pytest.approx(1e-5)
    constant = TrainConfig(out_dir=tmp_path, lr=1e-3, warmup_steps=10, diffusion_steps=200)
    assert constant.diffusion_lr(199) == pytest.approx(1e-3)


@pytest.mark.parametrize("start", [-1, 200, 500])
def test_lr_decay_start_must_lie_inside_the_diffusion_phase(tmp_path: Path, start: int) -> None:
    with pytest.raises(TrainError, match="lr_decay_from"):
        TrainConfig(out_dir=tmp_path, diffusion_steps=200, lr_decay_from=start)


def test_blind_padding_replaces_the_eos_run_of_the_chosen_captions_only() -> None:
    eos = 9
    ids = torch.tensor([[1, 5, 6, eos, eos, eos], [1, 5, eos, eos, eos, eos], [1, 5, 6, 7, 8, eos]])
    context = torch.arange(3 * 6 * 2, dtype=torch.float32).view(3, 6, 2)
    empty = torch.full((1, 6, 2), -1.0)
    out = blind_padding(context, ids, empty, eos, torch.tensor([True, False, True]))
    expected = context.clone()
    expected[0, 3:] = -1.0  # from the first EOS (position 3) on
    expected[2, 5:] = -1.0
    assert torch.equal(out, expected)
    assert torch.equal(context, torch.arange(36, dtype=torch.float32).view(3, 6, 2))  # input untouched


def test_padding_blind_prob_is_validated(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="padding_blind_prob"):
        TrainConfig(out_dir=tmp_path, padding_blind_prob=1.5)


def test_foreign_tags_are_words_the_world_never_uses_added_to_whole_captions() -> None:
    captions = ["red circle, solo, white background", "blue star, 2shapes, cropped"]
    batcher = CaptionBatcher(captions)
    tokenizer = load_clip_tokenizer()
    world = {t for c in captions for tag in c.split(", ") for t in tokenizer.encode(tag)}
    comma = tokenizer.encode(",")[0]
    torch.manual_seed(0)
    ids = batcher.batch([0, 1] * 20, dropout=0.0, foreign_prob=1.0)
    for row, caption in zip(ids.tolist(), captions * 20, strict=True):
        body = row[1 : row.index(tokenizer.eos_id)]
        words = [t for t in body if t != comma]
        own = [t for tag in caption.split(", ") for t in tokenizer.encode(tag)]
        foreign = [t for t in words if t not in world]
        assert sorted(t for t in words if t in world) == sorted(own)  # every tag kept
        assert 1 <= len(foreign) <= 3
        assert body.count(comma) == len(caption.split(", ")) - 1 + len(foreign)  # one tag per foreign word
    torch.manual_seed(0)
    plain = batcher.batch([0, 1] * 20, dropout=0.0)
    bodies = [row[1 : row.index(tokenizer.eos_id)] for row in plain.tolist()]
    assert all(t in world or t == comma for body in bodies for t in body)


def test_foreign_tag_prob_is_validated(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="foreign_tag_prob"):
        TrainConfig(out_dir=tmp_path, foreign_tag_prob=-0.1)


@pytest.mark.slow  # about 10 s of training steps
def test_blind_padding_and_foreign_tags_act_from_their_step_only(tmp_path: Path) -> None:
    base = dict(n_images=8, vae_steps=2, vae_batch=4, batch_size=4, warmup_steps=1, decoder_steps=0,
                checkpoint_minutes=1000.0)
    on = dict(padding_blind_from=2, padding_blind_prob=1.0, foreign_tags_from=2, foreign_tag_prob=1.0)
    off = dict(padding_blind_from=None, foreign_tags_from=None)

    def run(name: str, steps: int, options: dict[str, object]) -> dict[str, torch.Tensor]:
        config = TrainConfig(out_dir=tmp_path / name, diffusion_steps=steps, **base, **options)  # type: ignore[arg-type]
        return _tensors(train(config, log_fn=lambda _: None))

    before_on, before_off = run("a", 2, on), run("b", 2, off)
    assert all(torch.equal(before_on[k], before_off[k]) for k in before_off)
    after_on, after_off = run("c", 3, on), run("d", 3, off)
    unet = [k for k in after_off if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(after_on[k], after_off[k]) for k in unet)


@pytest.mark.slow  # about 10 s of training steps
def test_upright_pictures_replace_the_turned_ones_from_their_step_only(tmp_path: Path) -> None:
    base = dict(n_images=8, vae_steps=2, vae_batch=4, batch_size=4, warmup_steps=1, decoder_steps=0,
                checkpoint_minutes=1000.0, padding_blind_from=None, foreign_tags_from=None)

    def run(name: str, steps: int, upright_from: int | None) -> dict[str, torch.Tensor]:
        config = TrainConfig(out_dir=tmp_path / name, diffusion_steps=steps, upright_from=upright_from,
                             **base)  # type: ignore[arg-type]
        return _tensors(train(config, log_fn=lambda _: None))

    before_on, before_off = run("a", 2, 2), run("b", 2, None)
    assert all(torch.equal(before_on[k], before_off[k]) for k in before_off)
    after_on, after_off = run("c", 3, 2), run("d", 3, None)
    unet = [k for k in after_off if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(after_on[k], after_off[k]) for k in unet)
    # The cached upright set: the same captions, other pixels, encoded into latents of the same shape.
    turned = torch.load(tmp_path / "c" / "images.pt", weights_only=True)
    upright = torch.load(tmp_path / "c" / "images-upright.pt", weights_only=True)
    assert upright["captions"] == turned["captions"]
    assert not torch.equal(upright["images"], turned["images"])
    latents = torch.load(tmp_path / "c" / "latents.pt", weights_only=True)["mean"]
    assert torch.load(tmp_path / "c" / "latents-upright.pt", weights_only=True)["mean"].shape == latents.shape
    assert not (tmp_path / "d" / "images-upright.pt").exists()


def test_init_from_continues_a_file_with_its_vae_and_scaling_factor(
    tiny_run: tuple[TrainConfig, Path], tmp_path: Path
) -> None:
    config, source = tiny_run
    start = {**config.__dict__, "out_dir": tmp_path / "a", "init_from": str(source), "diffusion_steps": 2}
    lines: list[str] = []
    # lr 0: AdamW moves nothing, so the export must be the source file itself, tensor for tensor (its
    # fp16 weights load into fp32 modules and round back exactly) - every module was copied.
    same = train(TrainConfig(**{**start, "lr": 0.0}), log_fn=lines.append)
    assert not any(line.startswith("vae ") for line in lines)  # no VAE phase
    assert any(line.startswith("starting from") for line in lines)
    before, after = _tensors(source), _tensors(same)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # With an lr the UNet moves on from the file while the VAE and the scaling factor stay its own.
    moved = _tensors(train(TrainConfig(**{**start, "out_dir": tmp_path / "b"}), log_fn=lambda _: None))
    vae_keys = [k for k in before if k.startswith("first_stage_model.")]
    unet_keys = [k for k in before if k.startswith("model.diffusion_model.")]
    assert vae_keys and all(torch.equal(before[k], moved[k]) for k in vae_keys)
    assert any(not torch.equal(before[k], moved[k]) for k in unet_keys)
    from safetensors import safe_open

    def scaling(path: Path) -> float:
        with safe_open(str(path), framework="pt") as f:
            return float(json.loads(f.metadata()["voidprompt.arch"])["scaling_factor"])

    assert scaling(tmp_path / "b" / "model.safetensors") == scaling(source)


def test_init_from_refuses_a_missing_file_or_another_native_size(
    tiny_run: tuple[TrainConfig, Path], tmp_path: Path
) -> None:
    config, source = tiny_run
    base = {**config.__dict__, "out_dir": tmp_path}
    with pytest.raises(TrainError, match=r"--init-from.*no such file"):
        train(TrainConfig(**{**base, "init_from": str(tmp_path / "nope.safetensors")}), log_fn=lambda _: None)
    with pytest.raises(TrainError, match="64 px model, not 48; pass --image-size 64"):
        train(TrainConfig(**{**base, "init_from": str(source), "image_size": 48}), log_fn=lambda _: None)
    assert not (tmp_path / "state.pt").exists()


def test_train_command_line_maps_flags_onto_the_config_and_defaults_onto_its_defaults(tmp_path: Path) -> None:
    from voidprompt.demo.cli import train_config

    config, resume = train_config(["--out", str(tmp_path)])
    assert not resume
    assert config == TrainConfig(out_dir=tmp_path)  # no flag: the committed model's settings
    config, resume = train_config([
        "--out", str(tmp_path), "--resume", "--minutes", "5", "--diffusion-steps", "300", "--lr", "1e-3",
        "--padding-blind-from", "none", "--foreign-tags-from", "100", "--lr-decay-from", "200",
        "--upright-from", "250", "--min-snr-gamma", "none", "--image-size", "128",
        "--vae-full-from", "1.0", "--half-size-until", "200", "--device", "cuda:1", "--ema-decay", "0.999",
        "--init-from", "base.safetensors",
    ])
    assert resume
    assert config == TrainConfig(
        out_dir=tmp_path, minutes=5.0, diffusion_steps=300, lr=1e-3, padding_blind_from=None,
        foreign_tags_from=100, lr_decay_from=200, upright_from=250, min_snr_gamma=None, image_size=128,
        vae_full_from=1.0, half_size_until=200, device="cuda:1", ema_decay=0.999,
        init_from="base.safetensors",
    )
    config, _ = train_config(["--min-snr-gamma", "2.5"])
    assert config.min_snr_gamma == 2.5


def test_train_command_line_rejects_a_step_that_is_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    from voidprompt.demo.cli import train_config

    with pytest.raises(SystemExit):
        train_config(["--lr-decay-from", "soon"])
    assert "'soon' is not a step" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_config(["--min-snr-gamma", "high"])
    assert "'high' is not a number" in capsys.readouterr().err

"""`voidprompt demo tune-decoder`: only the decoder changes, the stream of fresh pictures resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from voidprompt.demo.cli import tune_decoder_config
from voidprompt.demo.decoder_tune import DECODER_KEY_PREFIXES, DecoderTuneConfig, tune_decoder
from voidprompt.demo.train import TrainConfig, TrainError, train
from voidprompt.demo.world import WorldConfig, draw, make_dataset

quiet = lambda _: None  # noqa: E731


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(out_dir=out, n_images=8, vae_steps=2, vae_batch=4, diffusion_steps=1, batch_size=4,
                         warmup_steps=1, decoder_steps=0, checkpoint_minutes=1000.0)
    return train(config, log_fn=quiet)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _config(model: Path, out: Path, **kw: object) -> DecoderTuneConfig:
    settings: dict[str, object] = dict(steps=2, batch_size=2, checkpoint_minutes=1000.0)
    settings.update(kw)
    return DecoderTuneConfig(model=model, out_dir=out, **settings)  # type: ignore[arg-type]


def test_draw_gives_the_picture_make_dataset_yields_at_that_index() -> None:
    world = WorldConfig()
    listed = list(make_dataset(5, 31, 64, world))
    for i in (0, 3, 4):
        image, text, scene = draw(31, i, world)
        assert np.array_equal(np.asarray(image), np.asarray(listed[i][0]))
        assert (text, scene) == (listed[i][1], listed[i][2])
    assert not np.array_equal(np.asarray(draw(31, 0, world)[0]), np.asarray(draw(32, 0, world)[0]))


def test_only_the_decoder_changes_and_the_file_keeps_its_metadata(tiny_model: Path, tmp_path: Path) -> None:
    from voidprompt.models.load import load_model

    path = tune_decoder(_config(tiny_model, tmp_path / "t"), log_fn=quiet)
    before, after = _tensors(tiny_model), _tensors(path)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(DECODER_KEY_PREFIXES) for k in changed)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in changed)
    assert all(after[k].dtype == before[k].dtype for k in before)  # fp16 stays fp16
    meta_before, meta_after = _metadata(tiny_model), _metadata(path)
    assert {k: meta_after[k] for k in meta_before} == meta_before
    tune = json.loads(meta_after["voidprompt.decoder_tune"])
    assert tune["step"] == 2 and tune["config"]["world_seed"] == 777001
    c = load_model(path)
    assert not c.report.unused and not c.report.missing


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    tiny_model: Path, tmp_path: Path
) -> None:
    whole = _tensors(tune_decoder(_config(tiny_model, tmp_path / "whole", steps=3), log_fn=quiet))
    tune_decoder(_config(tiny_model, tmp_path / "parts", steps=1), log_fn=quiet)
    lines: list[str] = []
    parts = _tensors(tune_decoder(_config(tiny_model, tmp_path / "parts", steps=3), resume=True,
                                  log_fn=lines.append))
    assert any("resumed" in line and "step 1" in line for line in lines)
    assert all(torch.equal(whole[k], parts[k]) for k in whole)


def test_the_adversarial_term_changes_the_update_from_its_step_on(tiny_model: Path, tmp_path: Path) -> None:
    plain = _tensors(tune_decoder(_config(tiny_model, tmp_path / "plain"), log_fn=quiet))
    lines: list[str] = []
    late = _tensors(tune_decoder(_config(tiny_model, tmp_path / "late", adversarial_weight=0.5,
                                         adversarial_from=1), log_fn=lines.append))
    early = _tensors(tune_decoder(_config(tiny_model, tmp_path / "early", adversarial_weight=0.5),
                                  log_fn=quiet))
    decoder = [k for k in plain if k.startswith(DECODER_KEY_PREFIXES)]
    # From step 1 on the generator loss enters the decoder's update: both GAN runs leave the plain one.
    assert any(not torch.equal(plain[k], late[k]) for k in decoder)
    assert any(not torch.equal(late[k], early[k]) for k in decoder)
    assert all(torch.isfinite(late[k].float()).all() for k in decoder)
    assert any(" d " in line and " g " in line for line in lines)


def test_bad_runs_are_refused_with_the_fix(tiny_model: Path, tmp_path: Path) -> None:
    tune_decoder(_config(tiny_model, tmp_path / "run", steps=1), log_fn=quiet)
    with pytest.raises(TrainError, match="--resume"):
        tune_decoder(_config(tiny_model, tmp_path / "run", steps=1), log_fn=quiet)
    with pytest.raises(TrainError, match=r"no .* to resume"):
        tune_decoder(_config(tiny_model, tmp_path / "new"), resume=True, log_fn=quiet)
    with pytest.raises(TrainError, match="same --world-seed"):
        tune_decoder(_config(tiny_model, tmp_path / "run", world_seed=5), resume=True, log_fn=quiet)
    with pytest.raises(TrainError, match="batch_size 2"):
        tune_decoder(_config(tiny_model, tmp_path / "run", batch_size=4), resume=True, log_fn=quiet)
    with pytest.raises(TrainError, match="no such checkpoint"):
        tune_decoder(_config(tmp_path / "missing.safetensors", tmp_path / "other"), log_fn=quiet)
    with pytest.raises(TrainError, match="adversarial_weight"):
        _config(tiny_model, tmp_path, adversarial_weight=0.0)
    with pytest.raises(TrainError, match="adversarial_from"):
        _config(tiny_model, tmp_path, adversarial_from=2)


def test_command_line_maps_flags_and_defaults_to_the_miniature_model(tmp_path: Path) -> None:
    from voidprompt.demo.miniature import miniature_model_path

    config, resume = tune_decoder_config(["--out", str(tmp_path), "--steps", "40", "--adversarial-weight",
                                          "0.3", "--world-seed", "9", "--resume"])
    assert resume and config.out_dir == tmp_path and config.steps == 40
    assert config.adversarial_weight == 0.3 and config.world_seed == 9
    assert config.model == miniature_model_path()
    default, resume = tune_decoder_config(["--adversarial-weight", "none"])
    assert not resume and default.adversarial_weight is None and default.steps == DecoderTuneConfig(
        model=Path("."), out_dir=Path(".")).steps

"""A1111's NaN check through the Engine and the CLI: a model, VAE, LoRA, embedding or hypernetwork
that makes NaN stops the generation with A1111's message and saves nothing; ``--disable-nan-check``
keeps A1111's black picture instead."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from voidprompt.cli import main
from voidprompt.errors import NansError
from voidprompt.models.components import Components
from voidprompt.models.load import load_model
from voidprompt.models.networks.lora import build_layer_map
from voidprompt.pipeline.engine import Engine
from voidprompt.prompts.embeddings import EmbeddingDatabase
from voidprompt.request import GenerationRequest

UNET_MESSAGE = "A tensor with NaNs was produced in Unet."
VAE_MESSAGE = "A tensor with NaNs was produced in VAE."
REQUEST = GenerationRequest(prompt="a cat", seed=3, steps=2, width=32, height=32, sampler_name="Euler")
CLI_ARGS = ["--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32", "--seed", "3"]
# A feed-forward output: at 1e30 times its LoRA it overflows float32 (a query only saturates the
# attention's softmax, which stays finite).
LORA_LAYER = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"


@pytest.fixture(scope="module")
def components(tiny_checkpoint: Path) -> Components:
    return load_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def plain(components: Components) -> np.ndarray:
    """REQUEST's picture from the healthy model: after a failure, the networks must come off."""
    return np.asarray(Engine(components).generate(REQUEST).images[0])


@pytest.fixture
def poisoned(components: Components, plain: np.ndarray) -> Iterator[Components]:
    """The shared components; a test may write NaN into a weight, and every weight is put back."""
    saved = {name: t.clone() for name, t in components.vae.state_dict().items()}
    saved_unet = {name: t.clone() for name, t in components.unet.state_dict().items()}
    yield components
    components.vae.load_state_dict(saved)
    components.unet.load_state_dict(saved_unet)


def _nan_unet_checkpoint(tiny_checkpoint: Path, path: Path) -> Path:
    state = load_file(str(tiny_checkpoint))
    with safe_open(str(tiny_checkpoint), "pt") as source:
        metadata = source.metadata()  # the tiny architecture's constants
    key = "model.diffusion_model.input_blocks.0.0.weight"  # the UNet's first convolution
    state[key] = state[key].clone()
    state[key][0, 0, 0, 0] = float("nan")
    save_file(state, str(path), metadata=metadata)
    return path


def _one_line(error: pytest.ExceptionInfo[NansError]) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert message.endswith("Use --disable-nan-check to turn this check off.")
    return message


def test_a_unet_weight_that_is_nan_fails_with_a1111s_unet_message(poisoned: Components) -> None:
    with torch.no_grad():
        poisoned.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NansError) as error:
        Engine(poisoned).generate(REQUEST)
    message = _one_line(error)
    assert message.startswith(UNET_MESSAGE) and "fp32" in message


def test_a_vae_weight_that_is_nan_fails_with_a1111s_vae_message(poisoned: Components) -> None:
    with torch.no_grad():
        poisoned.vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NansError) as error:
        Engine(poisoned).generate(REQUEST)
    assert _one_line(error).startswith(VAE_MESSAGE)


@contextlib.contextmanager
def nan_fractions(unet: torch.nn.Module) -> Iterator[list[float]]:
    """The share of NaN in each UNet output while the block runs."""
    fractions: list[float] = []

    def record(_module: torch.nn.Module, _args: object, output: Any) -> None:
        fractions.append(float(output.sample.isnan().float().mean()))

    handle = unet.register_forward_hook(record)
    try:
        yield fractions
    finally:
        handle.remove()


def test_the_unet_is_checked_once_after_the_last_step(poisoned: Components) -> None:
    # A1111 1.10 tests the sampled latents, not each denoiser call: every step runs, then it fails.
    with torch.no_grad():
        poisoned.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with nan_fractions(poisoned.unet) as fractions, pytest.raises(NansError):
        Engine(poisoned).generate(REQUEST.replace(steps=4))
    assert fractions == [1.0] * 4


def test_hires_fix_stops_at_the_first_pass_decode(poisoned: Components) -> None:
    # A1111 decodes the first pass for a pixel upscaler with the check on: the hires pass never runs.
    with torch.no_grad():
        poisoned.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    request = REQUEST.replace(enable_hr=True, hr_upscaler="Lanczos", hr_scale=2, hr_second_pass_steps=3)
    with nan_fractions(poisoned.unet) as fractions, pytest.raises(NansError) as error:
        Engine(poisoned).generate(request)
    assert _one_line(error).startswith(UNET_MESSAGE)
    assert len(fractions) == REQUEST.steps


def test_disable_nan_check_keeps_a1111s_black_picture(poisoned: Components) -> None:
    with torch.no_grad():
        poisoned.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    result = Engine(poisoned, disable_nan_check=True).generate(REQUEST.replace(batch_size=2))
    assert len(result.images) == 2
    for image in result.images:
        assert image.size == (32, 32) and not np.asarray(image).any()


# ----------------------------------------------------------------------------------------- networks


def _lora_folder(components: Components, folder: Path, *, poison: float | None) -> Path:
    layer = build_layer_map(components.unet, components.text_encoder)[LORA_LAYER]
    out_features, in_features = layer.module.weight.shape
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(out_features, 2, generator=gen)
    if poison is not None:
        up[0, 0] = poison
    tensors = {
        f"{LORA_LAYER}.lora_up.weight": up,
        f"{LORA_LAYER}.lora_down.weight": torch.randn(2, in_features, generator=gen),
        f"{LORA_LAYER}.alpha": torch.tensor(2.0),
    }
    folder.mkdir()
    save_file(tensors, str(folder / "style.safetensors"))
    return folder


def _healthy_again(engine: Engine, plain: np.ndarray) -> bool:
    # The next request without the network takes it off and gives the healthy model's picture.
    return np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), plain)


def test_a_lora_holding_inf_fails_with_the_unet_message(
    components: Components, plain: np.ndarray, tmp_path: Path
) -> None:
    engine = Engine(components, lora_dir=_lora_folder(components, tmp_path / "lora", poison=float("inf")))
    with pytest.raises(NansError) as error:
        engine.generate(REQUEST.replace(prompt="a cat <lora:style:1>"))
    assert _one_line(error).startswith(UNET_MESSAGE)
    assert _healthy_again(engine, plain)


def test_a_lora_multiplier_of_1e30_fails_with_the_unet_message(
    components: Components, plain: np.ndarray, tmp_path: Path
) -> None:
    engine = Engine(components, lora_dir=_lora_folder(components, tmp_path / "lora", poison=None))
    styled = np.asarray(engine.generate(REQUEST.replace(prompt="a cat <lora:style:1>")).images[0])
    assert styled.std() > 10 and not np.array_equal(styled, plain)  # at 1 the LoRA is harmless
    with pytest.raises(NansError) as error:
        engine.generate(REQUEST.replace(prompt="a cat <lora:style:1e30>"))
    assert _one_line(error).startswith(UNET_MESSAGE)
    assert _healthy_again(engine, plain)


def test_an_embedding_holding_nan_fails_with_the_unet_message(
    components: Components, plain: np.ndarray, tmp_path: Path
) -> None:
    # The embedding is in the prompt only: the first UNet call is NaN in its cond half and fine in
    # its uncond half; CFG spreads the NaN over the whole latent, and the latents fail the check.
    width = int(components.text_encoder.config.hidden_size)
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    vectors[1, 3] = float("nan")
    (tmp_path / "emb").mkdir()
    save_file({"emb_params": vectors}, str(tmp_path / "emb" / "broken.safetensors"))
    database = EmbeddingDatabase(components.tokenizer, width=width)
    database.load_folder(tmp_path / "emb")
    engine = Engine(components, embeddings=database)
    with nan_fractions(components.unet) as fractions, pytest.raises(NansError) as error:
        engine.generate(REQUEST.replace(prompt="a broken cat"))
    assert _one_line(error).startswith(UNET_MESSAGE)
    assert fractions == [0.5, 1.0]
    assert _healthy_again(engine, plain)


def test_a_hypernetwork_holding_nan_fails_with_the_unet_message(
    components: Components, plain: np.ndarray, tmp_path: Path
) -> None:
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    layers: dict[object, object] = {
        "layer_structure": [1, 1],
        "activation_func": "linear",
        "is_layer_norm": False,
        "use_dropout": False,
        "activate_output": False,
        "name": "broken",
    }
    for width in (32, 64):
        weight = torch.randn(width, width, generator=gen) * 0.1
        weight[0, 0] = float("nan")
        module = {"linear.0.weight": weight, "linear.0.bias": torch.zeros(width)}
        layers[width] = (module, {k: v.clone() for k, v in module.items()})
    torch.save(layers, folder / "broken.pt")
    engine = Engine(components, hypernet_dir=folder)
    with pytest.raises(NansError) as error:
        engine.generate(REQUEST.replace(prompt="a cat <hypernet:broken:1>"))
    assert _one_line(error).startswith(UNET_MESSAGE)
    assert _healthy_again(engine, plain)


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def nan_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _nan_unet_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("nan") / "nan.safetensors")


@pytest.mark.parametrize("command", ["txt2img", "img2img"])
def test_the_cli_prints_the_message_saves_nothing_and_exits_2(
    nan_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "out"
    extra: list[str] = []
    if command == "img2img":
        from PIL import Image

        Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "init.png")
        extra = ["--init-image", str(tmp_path / "init.png")]
    code = main([command, "--model", str(nan_checkpoint), *CLI_ARGS, *extra, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    # After the model's loading line and the steps' progress lines, the error in one line.
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("voidprompt: loading ") and lines[1].startswith("voidprompt: model loaded")
    assert lines[-1].startswith(f"voidprompt: error: {UNET_MESSAGE}")
    assert all(line.startswith("voidprompt: step ") for line in lines[2:-1])
    assert captured.out == ""
    assert not out.exists() or not any(out.iterdir())


def test_the_cli_with_disable_nan_check_saves_the_black_picture(
    nan_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    out = tmp_path / "out"
    args = ["txt2img", "--model", str(nan_checkpoint), *CLI_ARGS, "--disable-nan-check", "--out", str(out)]
    code = main(args)
    assert code == 0
    saved = sorted(out.iterdir())
    assert len(saved) == 1 and capsys.readouterr().out.strip() == str(saved[0])
    with Image.open(saved[0]) as image:
        assert image.size == (32, 32) and not np.asarray(image).any()
        assert image.info["parameters"].startswith("a cat\n")


# --------------------------------------------------------------------------------------------- lab


def test_a_study_on_a_nan_model_marks_its_jobs_failed_and_stores_no_picture(
    nan_checkpoint: Path, tmp_path: Path
) -> None:
    from voidprompt.lab.catalog import Catalog
    from voidprompt.lab.run import run_study
    from voidprompt.lab.study import parse_study

    text = f"""
[study]
name = "nan"
master_seed = 11
[model]
checkpoint = "{nan_checkpoint}"
[settings]
sampler_name = "Euler"
steps = 2
[prompt]
positive = "a cat"
[axes]
size = "16x16, 32x16"
seed = "2 random"
[labels]
labeler = "none"
"""
    study = parse_study(text, tmp_path / "nan.toml")
    report = run_study(study, study.run.override(progress=False, batch_size=2))
    assert (report.total, report.generated, report.batches) == (4, 0, 0)
    assert len(report.failed) == 4
    assert all(reason.startswith(UNET_MESSAGE) for reason in report.failed.values())
    with Catalog.open(report.catalog_path, readonly=True) as catalog:
        summary = catalog.summary()
        assert (summary.jobs, summary.failed, summary.images) == (4, 4, 0)
    assert not list(report.catalog_path.parent.rglob("*.png"))
    # `study run --disable-nan-check` keeps A1111's black pictures instead.
    from PIL import Image

    from voidprompt.lab.cli import main

    (tmp_path / "nan.toml").write_text(text)
    catalog = tmp_path / "again.sqlite"
    flags = ["--batch-size", "2", "--catalog", str(catalog), "--no-progress"]
    assert main(["run", str(tmp_path / "nan.toml"), *flags, "--disable-nan-check"]) == 0
    with Catalog.open(catalog, readonly=True) as again:
        images = again.images()
    assert len(images) == 4
    for image in images:
        with Image.open(catalog.parent / image["path"]) as png:
            assert np.asarray(png.convert("RGB")).max() == 0

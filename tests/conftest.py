"""Shared fixtures. Tiny models are built in memory; nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    # Every test starts with one intra-op thread, whatever an earlier test set (the trainer and the
    # gallery set their own): the models here are tiny, and on a shared 2-core machine a second thread
    # that waits for a busy core makes a generation ten times slower, not faster.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-layout .safetensors (random weights, CompVis keys), written once per session."""
    from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

    return Path(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from voidprompt.models.load import load_model
    from voidprompt.pipeline.engine import Engine

    return Engine(load_model(tiny_checkpoint))


@pytest.fixture(scope="session")
def tiny_miniature(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the miniature model's layout (its trainer's architecture, fp16 export and
    ``voidprompt.*`` metadata) trained one step on 32 px pictures: what the demo's tools (fine-tune,
    gallery, measurements) need from a miniature checkpoint, in seconds. Nothing it draws is
    meaningful; tests that need a trained model's pictures are in the slow suite."""
    from voidprompt.demo.train import TrainConfig, train

    config = TrainConfig(
        out_dir=tmp_path_factory.mktemp("tiny-miniature"),
        image_size=32,
        vae_crop=32,
        n_images=4,
        vae_steps=1,
        vae_batch=4,
        diffusion_steps=1,
        batch_size=4,
        warmup_steps=1,
        decoder_steps=0,
        checkpoint_minutes=1000.0,
    )
    return train(config, log_fn=lambda _: None)


@pytest.fixture(scope="session")
def tiny_f8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's UNet and text encoder with a narrow VAE that downsamples by 8, as SD's
    does (the tiny VAE downsamples by 2). The tiny UNet attends at the latent's full size, so with
    this VAE a 256x256 picture costs a 32x32 latent instead of 128x128 (a hundred times less
    attention): for studies of big pictures."""
    import dataclasses

    from voidprompt.models.arch import build_modules
    from voidprompt.models.convert import modules_to_compvis
    from voidprompt.models.load import sd1_alphas_cumprod
    from voidprompt.testing.fake_checkpoints import TINY_ARCH, tiny_sd1_modules, write_tiny_checkpoint

    unet, _, text_encoder = tiny_sd1_modules(seed=0)
    arch = dataclasses.replace(
        TINY_ARCH, vae=dataclasses.replace(TINY_ARCH.vae, channels=8, channel_mult=(1, 1, 2, 2))
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        _, vae, _ = build_modules(arch, device="cpu")
    state = modules_to_compvis(unet, vae.eval(), text_encoder, alphas_cumprod=sd1_alphas_cumprod())
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-f8") / "tiny-f8.safetensors", state_dict=state)

"""``train``: the four phases in order, resumable at any point (see :mod:`voidprompt.demo.train`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from voidprompt.demo.preview_fit import FIT_PICTURES, add_preview_map
from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.train.data import cached_posterior, world_images
from voidprompt.demo.train.decoder import DecoderProcess, finetune_decoder
from voidprompt.demo.train.phases import diffusion_phase, latent_phase, vae_phase
from voidprompt.demo.train.state import start

__all__ = ["train"]


def train(config: TrainConfig, *, resume: bool = False, log_fn: Callable[[str], None] = print) -> Path:
    """Run (or resume) the four phases; returns the path of ``model.safetensors`` in ``out_dir``."""
    torch.set_num_threads(1)
    run = start(config, resume=resume, log_fn=log_fn)
    state, model_path = run.state, run.model_path

    images, captions = world_images(config, log_fn)
    half_images = None
    if config.half_size_until is not None:
        half_images, half_captions = world_images(config, log_fn, half=True)
        if half_captions != captions:
            raise TrainError("the half-size world's captions differ from the native one's; the world must "
                             "draw the same scenes at any size (see world.make_dataset)")
    run.last_checkpoint = time.perf_counter()

    if state.phase == "vae" and vae_phase(run, images if half_images is None else half_images):
        return model_path
    latents = latent_phase(run, images)
    half_latents = None
    if half_images is not None:
        half = half_images
        half_latents = cached_posterior(config, run.vae, "half", lambda: half, log_fn)
    decoder_job = None
    beside = config.threads >= 2 and run.device.type == "cpu"
    if beside and state.phase == "diffusion" and config.decoder_steps:
        decoder_job = DecoderProcess(config, run.vae, images, latents, run.deadline - time.perf_counter())

    if state.phase == "diffusion" and diffusion_phase(run, captions, latents, half_latents):
        if decoder_job is not None:
            decoder_job.join()  # it stops at the same time cap, its state saved
        return model_path
    if decoder_job is not None:
        log_fn("waiting for the decoder phase running beside")
        decoder_job.join()

    if state.phase in ("decoder", "done"):
        finished = finetune_decoder(config, run.vae, images, latents, run.deadline, log_fn)
        state.phase = "done" if finished else "decoder"
        run.checkpoint()
        if not finished:
            log_fn(f"time cap of {config.minutes} min reached; continue with --resume")
            return model_path
    started = time.perf_counter()
    # As many pictures as the run learned from, up to the standard count (a tiny test run: a few).
    add_preview_map(model_path, n=min(FIT_PICTURES, config.n_images))
    log_fn(f"fitted the cheap preview map into the model file in {time.perf_counter() - started:.0f} s")
    log_fn(f"done: {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    return model_path

"""Phase 4, ``decoder``: the VAE decoder alone is fine-tuned on the cached latents.

The encoder, and so the latent space the UNet learnt, stay fixed - as Stability's ft-MSE VAE did for
SD1. The joint VAE phase ends with a blurry decoder (shapes' corners lost); the latents carry far more
than it shows (posterior std 0.08 against a latent std of 4.2). This phase has its own RNG and its own
state file (``decoder.pt``) and depends only on phases 1-2, so its result does not depend on whether
it runs before, after or beside phase 3. With ``threads >= 2`` it runs beside phase 3 in a second
process; every phase computes on one thread, so the weights do not depend on the machine.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from voidprompt.demo.train.checkpoint import atomic_save, on_cpu
from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.train.data import Latents, to_unit
from voidprompt.demo.train.modules import adamw, fresh_modules, reconstruction_losses

__all__ = ["DecoderProcess", "finetune_decoder"]


class DecoderProcess:
    """Phase 4 in a second process (one thread), started when phase 3 starts. It writes the same
    ``decoder.pt`` as the phase run in line, which the main process then finishes from (loading the
    EMA), so a run with ``threads >= 2`` gives the weights of a run with ``threads=1``."""

    def __init__(self, config: TrainConfig, vae: Any, images: torch.Tensor, latents: Latents,
                 seconds_left: float) -> None:
        # spawn, not fork: a forked child would inherit the parent's torch thread pools and locks.
        context = multiprocessing.get_context("spawn")
        vae_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        self._process = context.Process(
            target=_decoder_process_main,
            args=(config, vae_state, images, latents, seconds_left),
            name="voidprompt-decoder-phase",
            daemon=True,  # stopped with the main process if it dies before joining
        )
        self._process.start()

    def join(self) -> None:
        self._process.join()
        if self._process.exitcode != 0:
            raise TrainError(
                f"the decoder phase beside the diffusion phase failed (exit code {self._process.exitcode}; "
                "its error is printed above); rerun with --resume, or with --threads 1 to run it in line"
            )


def _decoder_process_main(
    config: TrainConfig, vae_state: dict[str, torch.Tensor], images: torch.Tensor, latents: Latents,
    seconds_left: float,
) -> None:
    torch.set_num_threads(1)
    _, vae, _ = fresh_modules(config.seed)
    vae.load_state_dict(vae_state)
    deadline = time.perf_counter() + seconds_left
    finetune_decoder(config, vae, images, latents, deadline, lambda line: print(line, flush=True))


def finetune_decoder(
    config: TrainConfig,
    vae: Any,
    images: torch.Tensor,
    latents: Latents,
    deadline: float,
    log_fn: Callable[[str], None],
) -> bool:
    """Phase 4: fine-tune ``vae.decoder`` (and ``post_quant_conv``) on latents sampled from the cached
    posterior; loads its EMA into ``vae`` when done. Its state (weights, EMA, optimiser, generator,
    step) lives in ``decoder.pt``, separate from ``state.pt``, so the phase is independent of the
    diffusion phase. Returns False when the time cap stopped it first (``decoder.pt`` saved)."""
    path = config.out_dir / "decoder.pt"
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    names = [n for n, _ in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    opt = adamw(params, config.decoder_lr)
    gen = torch.Generator().manual_seed(config.seed + 4)
    step, seconds = 0, 0.0
    ema = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
    if path.exists():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        with torch.no_grad():
            for p, n in zip(params, names, strict=True):
                p.copy_(saved["weights"][n])
        ema = {n: v.to(params[0].device) for n, v in saved["ema"].items()}
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
        step, seconds = saved["step"], saved["seconds"]

    def save() -> None:
        weights = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
        atomic_save(on_cpu({"step": step, "seconds": seconds, "weights": weights, "ema": ema,
                             "opt": opt.state_dict(), "generator": gen.get_state()}), path)

    lat_mean, lat_std = latents
    n = images.shape[0]
    last_save = time.perf_counter()
    vae.train()
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        while step < config.decoder_steps:
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (config.decoder_batch,), generator=gen)
            x = to_unit(images[idx]).to(params[0].device)
            noise = torch.randn(lat_mean[idx].shape, generator=gen)
            z = (lat_mean[idx] + lat_std[idx] * noise).to(params[0].device)
            rec = vae.decode(z).sample
            l1, l2, edge = reconstruction_losses(rec, x)
            loss = l1 + l2 + config.edge_weight * edge
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            step += 1
            with torch.no_grad():
                decay = min(config.decoder_ema, (1.0 + step) / (10.0 + step))
                for p, name in zip(params, names, strict=True):
                    ema[name].mul_(decay).add_(p, alpha=1.0 - decay)
            seconds += time.perf_counter() - t0
            if step % 25 == 0 or step == 1:
                log_fn(f"decoder {step}/{config.decoder_steps} l1 {l1.item():.4f} edge {edge.item():.4f} "
                       f"({time.perf_counter() - t0:.2f} s/step)")
            now = time.perf_counter()
            if now >= deadline:
                save()
                return False
            if now - last_save >= config.checkpoint_minutes * 60.0:
                save()
                last_save = now
        if config.decoder_steps:
            save()
    finally:
        for p in vae.parameters():
            p.requires_grad_(True)
        vae.eval()
    if step:
        with torch.no_grad():
            for p, name in zip(params, names, strict=True):
                p.copy_(ema[name])
    log_fn(f"decoder: {step} fine-tune steps ({seconds:.0f} s)")
    return True

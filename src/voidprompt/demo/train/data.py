"""The training data: the world's pictures (drawn once, cached in ``out_dir``) and the VAE
encoder's posterior of each picture set, cached once the encoder is final."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from voidprompt.demo.train.checkpoint import atomic_save
from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.world import WorldConfig, draw_pixels

__all__ = ["Latents", "cached_posterior", "encode_posterior", "to_unit", "upright_images", "world_images"]


class Latents(NamedTuple):
    """The VAE encoder's posterior of a picture set: per picture, the mean and std of its latent."""

    mean: torch.Tensor
    std: torch.Tensor


def _cores() -> int:
    """Cores this process may use: the world's pictures are drawn on all of them (the training itself
    keeps to ``TrainConfig.threads``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call outside Linux
        return os.cpu_count() or 1


def world_images(
    config: TrainConfig, log_fn: Callable[[str], None], *, upright: bool = False, half: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) uint8 pictures and their captions, drawn once and cached in ``images.pt``
    (``images-upright.pt`` for the upright world: the same scenes and captions, shapes turned;
    ``images-half.pt`` for the same scenes at half the side, see ``TrainConfig.half_size_until``)."""
    size = config.image_size // 2 if half else config.image_size
    path = config.out_dir / ("images-upright.pt" if upright else "images-half.pt" if half else "images.pt")
    if path.exists():
        cached = torch.load(path, weights_only=True)
        same_size = cached["images"].shape[-1] == size
        if cached["seed"] == config.seed and len(cached["captions"]) == config.n_images and same_size:
            return cached["images"], list(cached["captions"])
    t0 = time.perf_counter()
    world = WorldConfig(size=size, upright=upright)
    pixels, captions = draw_pixels(config.seed, config.n_images, world, workers=_cores())
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    atomic_save({"seed": config.seed, "images": images, "captions": captions}, path)
    log_fn(f"drew {config.n_images} {'upright ' if upright else ''}{size} px world pictures in "
           f"{time.perf_counter() - t0:.0f} s")
    return images, captions


def encode_posterior(vae: Any, images: torch.Tensor) -> Latents:
    """The encoder's posterior mean and std of every picture (no randomness), on the CPU."""
    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], 64):
            posterior = vae.encode(to_unit(images[start : start + 64].to(device))).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
    return Latents(torch.cat(means), torch.cat(stds))


def cached_posterior(
    config: TrainConfig, vae: Any, name: str, draw: Callable[[], torch.Tensor], log_fn: Callable[[str], None]
) -> Latents:
    """Posterior of another picture set of the same scenes (``draw`` makes it, called only when the
    cache misses), cached in ``latents-<name>.pt``. The encoder is frozen after phase 1 (the decoder
    phase touches only the decoder), so these latents share the native latents' space and scaling factor."""
    path = config.out_dir / f"latents-{name}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("seed") == config.seed and cached["mean"].shape[0] == config.n_images:
            return Latents(cached["mean"], cached["std"])
    t0 = time.perf_counter()
    mean, std = encode_posterior(vae, draw())
    atomic_save({"seed": config.seed, "mean": mean, "std": std}, path)
    log_fn(f"cached {mean.shape[0]} {name} latents in {time.perf_counter() - t0:.0f} s")
    return Latents(mean, std)


def upright_images(config: TrainConfig, captions: list[str], log_fn: Callable[[str], None]) -> torch.Tensor:
    """The same scenes with upright shapes (``images-upright.pt``); their captions must be the same."""
    images, upright_captions = world_images(config, log_fn, upright=True)
    if upright_captions != captions:
        raise TrainError("the upright world's captions differ from the turned world's; the world "
                         "must draw the same scenes in both (see WorldConfig.upright)")
    return images


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 pictures -> floats in [-1, 1], the VAE's input range."""
    return images.float() / 127.5 - 1.0

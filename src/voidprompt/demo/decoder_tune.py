"""``voidprompt demo tune-decoder``: continue a checkpoint's VAE decoder on fresh world pictures.

The miniature model's adherence is capped by its VAE: a round trip alone turns small stars and squares
into blobs (docs/miniature-history.md). The training run's decoder phase sees the run's 3000 pictures
only; this command keeps training the decoder on pictures it has never seen - every step draws
``batch_size`` new ones from the world (picture ``i`` of seed ``world_seed``, so the stream is
reproducible and resumes where it stopped) - with the encoder frozen, so the latent space the UNet
learnt does not move and the UNet and text encoder stay valid. It writes a new checkpoint that is the
input file with only the decoder's tensors (``first_stage_model.decoder.*`` and ``post_quant_conv``)
replaced, bit for bit the rest, metadata kept.

Losses: L1 + L2 + ``edge_weight`` x L1 of image gradients (the training run's decoder loss), and
optionally a PatchGAN hinge loss (``adversarial_weight``), as Stable Diffusion's own VAE was trained:
a pixel loss alone is minimised by averaging the shapes the latent leaves open, which rounds corners;
the adversarial term rewards a decoder for committing to a sharp one. Its weight is adapted as in
taming-transformers (Esser et al. 2021): the ratio of the pixel loss's to the adversarial loss's
gradient norm at the decoder's last layer, times ``adversarial_weight``.

Every step computes on one thread (the trainer's rule: the weights must not depend on the machine).
State lives in ``tune.pt`` (written atomically every ``checkpoint_minutes`` and at the end), and the
model so far (the decoder's EMA) in ``model.safetensors`` beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voidprompt.demo.train import TrainError, adamw, atomic_save, reconstruction_losses, save_safetensors
from voidprompt.demo.world import WorldConfig, draw
from voidprompt.models.convert import modules_to_compvis
from voidprompt.models.load import load_model, open_checkpoint

__all__ = ["DECODER_KEY_PREFIXES", "DecoderTuneConfig", "PatchDiscriminator", "tune_decoder"]

# The CompVis keys this command rewrites; every other tensor of the input is copied unchanged.
DECODER_KEY_PREFIXES = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")
_MODULE_PREFIXES = ("decoder.", "post_quant_conv.")


@dataclass(frozen=True)
class DecoderTuneConfig:
    """Every setting of a decoder fine-tune; see the module docstring."""

    model: Path
    out_dir: Path
    steps: int = 6000
    batch_size: int = 16
    lr: float = 2e-4
    ema: float = 0.998
    edge_weight: float = 0.5
    grad_clip: float = 1.0
    # The fresh pictures: picture i of this world seed is the i-th of the stream (batch b draws
    # pictures b*batch_size ... b*batch_size+batch_size-1). The default is not the training run's
    # seed (20241122) nor any figure's (100000-500000), so no picture is one the model or a
    # measurement has seen.
    world_seed: int = 777001
    seed: int = 0  # posterior samples and the discriminator's initial weights
    adversarial_weight: float | None = None  # None: pixel losses only
    adversarial_from: int = 0  # step from which the discriminator trains and the term applies
    disc_lr: float = 2e-4
    checkpoint_minutes: float = 4.0
    minutes: float | None = None  # wall-clock cap for this invocation; the run saves and can resume

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise TrainError(f"steps={self.steps} and batch_size={self.batch_size} must be 1 or more")
        if not 0.0 <= self.ema < 1.0:
            raise TrainError(f"ema={self.ema}: must be within 0..1 (0 keeps no average)")
        if self.adversarial_weight is not None and self.adversarial_weight <= 0.0:
            raise TrainError(
                f"adversarial_weight={self.adversarial_weight}: must be above 0; leave it unset "
                "('none') for pixel losses only"
            )
        if not 0 <= self.adversarial_from < self.steps:
            raise TrainError(f"adversarial_from={self.adversarial_from} must lie in 0..steps-1")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"], d["out_dir"] = str(self.model), str(self.out_dir)
        return d


class PatchDiscriminator(nn.Module):
    """A small PatchGAN critic: one logit per overlapping ~22-pixel patch (14x14 of them at 64 px).
    Patches, not the whole picture: the decoder is to be sharp everywhere, not to fool a global
    judge of composition (which the frozen latent fixes anyway)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),
            nn.GroupNorm(8, 2 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * width, 4 * width, 4, 1, 1),
            nn.GroupNorm(8, 4 * width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4 * width, 1, 4, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _fresh_pictures(config: DecoderTuneConfig, step: int) -> torch.Tensor:
    """Batch ``step`` of the stream: (batch, 3, H, W) in [-1, 1]."""
    world = WorldConfig()
    first = step * config.batch_size
    pictures = [
        np.asarray(draw(config.world_seed, first + j, world)[0].convert("RGB"), dtype=np.float32)
        for j in range(config.batch_size)
    ]
    return torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _step_generator(config: DecoderTuneConfig, step: int) -> torch.Generator:
    # One generator per step, seeded from (seed, step): a resumed run draws what an uninterrupted
    # one would without saving generator state.
    return torch.Generator().manual_seed(config.seed * 1_000_003 + step)


@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _adaptive_weight(pixel_loss: torch.Tensor, adv_loss: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """taming-transformers' balance: |d pixel / d last| / |d adv / d last|, clamped, no gradient."""
    g_pixel = torch.autograd.grad(pixel_loss, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
    return (g_pixel.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def write_checkpoint(source: Path, target: Path, components: Any, info: dict[str, Any]) -> Path:
    """``source`` with its decoder tensors replaced by ``components.vae``'s (in the source's dtype),
    every other tensor and the metadata kept, ``voidprompt.decoder_tune`` added (replacing an earlier
    tune's record); written atomically."""
    compvis = modules_to_compvis(components.unet, components.vae, components.text_encoder)
    replaced = {k: v for k, v in compvis.items() if k.startswith(DECODER_KEY_PREFIXES)}
    with open_checkpoint(source) as reader:
        metadata = dict(reader.metadata)
        tensors = {}
        for key in reader.tensor_names():
            original = reader.get(key)
            if key in replaced:
                tensors[key] = replaced.pop(key).detach().to(original.dtype).contiguous().clone()
            else:
                tensors[key] = original
    if replaced:
        raise TrainError(
            f"{source}: lacks the decoder tensors {sorted(replaced)[:3]}; "
            "is it an SD1 checkpoint with its VAE?"
        )
    metadata["voidprompt.decoder_tune"] = json.dumps(info, sort_keys=True)
    return save_safetensors(tensors, metadata, target)


def tune_decoder(
    config: DecoderTuneConfig, *, resume: bool = False, log_fn: Callable[[str], None] = print
) -> Path:
    """Run (or resume) the fine-tune; returns the path of ``model.safetensors`` in ``out_dir``."""
    out = config.out_dir
    state_path, model_path = out / "tune.pt", out / "model.safetensors"
    if state_path.exists() and not resume:
        raise TrainError(f"{state_path} exists: pass --resume to continue that run, or use another --out")
    if resume and not state_path.exists():
        raise TrainError(f"--resume: no {state_path} to resume from; start without --resume")
    if not Path(config.model).is_file():
        raise TrainError(f"{config.model}: no such checkpoint; give --model the file to fine-tune")
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + config.minutes * 60.0 if config.minutes else math.inf

    components = load_model(config.model)
    vae = components.vae
    named = [(n, p) for n, p in vae.named_parameters() if n.startswith(_MODULE_PREFIXES)]
    params = [p for _, p in named]
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = adamw(params, config.lr)
    ema = {n: p.detach().clone() for n, p in named}
    adversarial_weight = config.adversarial_weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        disc = PatchDiscriminator()
    disc_opt = torch.optim.Adam(disc.parameters(), lr=config.disc_lr, betas=(0.5, 0.9))
    step, seconds = 0, 0.0
    if resume:
        saved = torch.load(state_path, weights_only=True)
        # These decide which pictures and noise each step sees; another value would silently
        # continue a different stream.
        stream = ("world_seed", "seed", "batch_size")
        if any(saved["config"][k] != getattr(config, k) for k in stream):
            was = ", ".join(f"{k} {saved['config'][k]}" for k in stream)
            raise TrainError(f"{state_path} was run with {was}; pass the same --world-seed, --seed and "
                             "--batch-size to resume")
        with torch.no_grad():
            for n, p in named:
                p.copy_(saved["weights"][n])
        ema = saved["ema"]
        opt.load_state_dict(saved["opt"])
        disc.load_state_dict(saved["disc"])
        disc_opt.load_state_dict(saved["disc_opt"])
        step, seconds = saved["step"], saved["seconds"]
        log_fn(f"resumed {state_path} at step {step}")
    last = vae.decoder.conv_out.weight

    def info() -> dict[str, Any]:
        return {"config": config.describe(), "step": step, "seconds": round(seconds),
                "command": "voidprompt demo tune-decoder"}

    def save() -> None:
        weights = {n: p.detach().clone() for n, p in named}
        atomic_save({"config": config.describe(), "step": step, "seconds": seconds, "weights": weights,
                     "ema": ema, "opt": opt.state_dict(), "disc": disc.state_dict(),
                     "disc_opt": disc_opt.state_dict()}, state_path)
        with torch.no_grad():
            for n, p in named:
                p.copy_(ema[n])
        write_checkpoint(Path(config.model), model_path, components, info())
        with torch.no_grad():
            for n, p in named:
                p.copy_(weights[n])
        log_fn(f"checkpoint: step {step} -> {state_path}, {model_path}")

    last_save = time.perf_counter()
    with _one_thread():
        while step < config.steps:
            t0 = time.perf_counter()
            gen = _step_generator(config, step)
            x = _fresh_pictures(config, step)
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
                z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            vae.decoder.train()
            rec = vae.decode(z).sample
            l1, l2, edge = reconstruction_losses(rec, x)
            loss = l1 + l2 + config.edge_weight * edge
            gan = False
            if adversarial_weight is not None and step >= config.adversarial_from:
                gan = True
                g_loss = -disc(rec).mean()
                loss = loss + adversarial_weight * _adaptive_weight(loss, g_loss, last) * g_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            if gan:
                # Hinge loss on real pictures against this step's (detached) reconstructions.
                d_loss = torch.relu(1.0 - disc(x)).mean() + torch.relu(1.0 + disc(rec.detach())).mean()
                disc_opt.zero_grad(set_to_none=True)
                d_loss.backward()
                disc_opt.step()
            step += 1
            with torch.no_grad():
                decay = min(config.ema, (1.0 + step) / (10.0 + step))
                for n, p in named:
                    ema[n].mul_(decay).add_(p, alpha=1.0 - decay)
            seconds += time.perf_counter() - t0
            if step % 25 == 0 or step in (1, config.steps):
                extra = f" d {d_loss.item():.3f} g {g_loss.item():.3f}" if gan else ""
                log_fn(f"tune-decoder {step}/{config.steps} l1 {l1.item():.4f} edge {edge.item():.4f}{extra} "
                       f"({time.perf_counter() - t0:.2f} s/step)")
            now = time.perf_counter()
            if now >= deadline:
                save()
                log_fn(f"time cap of {config.minutes} min reached; continue with --resume")
                return model_path
            if now - last_save >= config.checkpoint_minutes * 60.0:
                save()
                last_save = now
        save()
    log_fn(f"tune-decoder: {step} steps ({seconds:.0f} s) -> {model_path}")
    return model_path

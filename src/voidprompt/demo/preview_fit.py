"""The miniature model's own cheap preview map, fitted once and stored in its file.

A1111's "Approx cheap" factors (:mod:`voidprompt.models.latent_rgb`) fit SD1's VAE, not a VAE trained
from scratch: on the miniature model they miss by about 100 levels of 255 per channel. A linear map
fitted to its own VAE misses by about 25.

What the fit learns from: world pictures (:mod:`voidprompt.demo.world`, a seed the trainer never
uses) encoded by the model's VAE (posterior mean times the scaling factor: the sampler's latent
space), each paired with the full VAE decode of that latent, the picture the preview stands in for.
The other candidate, the final latents of short Euler generations decoded the same way, was measured
against it on held-out generated pictures and their x0 estimates along the trajectory: both miss by
about 26 levels there (within 2% of each other), while on held-out world pictures the world fit is
10% closer. The world needs no UNet, no sampler and no choice of prompts, covers every colour and
background the world has (a prompt list covers the colours it names), and costs seconds.

:func:`write_latent_rgb` stores the map as the file's ``voidprompt.latent_rgb`` metadata, rewriting
only the header: the tensors' bytes are copied unchanged, through a temporary file renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from voidprompt.demo.world import WorldConfig, draw_pixels
from voidprompt.errors import ModelLoadError
from voidprompt.files import PendingFile
from voidprompt.models.components import Components
from voidprompt.models.latent_rgb import LatentRGB, fit_latent_rgb
from voidprompt.models.load import load_model
from voidprompt.models.safetensors_stream import read_safetensors_header

__all__ = [
    "FIT_PICTURES",
    "FIT_SEED",
    "add_preview_map",
    "decode_to_unit",
    "fit_preview_map",
    "preview_error",
    "world_latents",
    "write_latent_rgb",
]

# The trainer draws seeds 20241122 and 11 (MODEL_CARD.md); this one is apart from both.
FIT_SEED = 31337
FIT_PICTURES = 256
_BATCH = 32


@torch.no_grad()
def world_latents(components: Components, seed: int, n: int) -> torch.Tensor:
    """World pictures ``0 .. n-1`` of ``seed`` at the model's native size, encoded: the posterior
    mean times the scaling factor, (n, C, h, w) float32 on the CPU."""
    size = int(components.arch.constants.vae_sample_size)
    pixels, _ = draw_pixels(seed, n, WorldConfig(size=size))
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    vae = components.vae
    parameter = next(vae.parameters())
    out = []
    for start in range(0, n, _BATCH):
        batch = images[start : start + _BATCH].to(parameter.device, torch.float32) / 127.5 - 1.0
        mean = vae.encode(batch.to(parameter.dtype)).latent_dist.mean
        out.append(mean.float().cpu() * components.scaling_factor)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def decode_to_unit(components: Components, latents: torch.Tensor) -> torch.Tensor:
    """The full VAE decode of sampler-space latents: (N, 3, H, W) float32 in [-1, 1] on the CPU."""
    vae = components.vae
    parameter = next(vae.parameters())
    out = []
    for start in range(0, latents.shape[0], _BATCH):
        z = latents[start : start + _BATCH].to(parameter.device, parameter.dtype) / components.scaling_factor
        out.append(vae.decode(z).sample.float().clamp(-1.0, 1.0).cpu())
    return torch.cat(out)


def fit_preview_map(components: Components, *, seed: int = FIT_SEED, n: int = FIT_PICTURES) -> LatentRGB:
    """The least-squares latent-to-RGB map of ``components``' VAE, from ``n`` world pictures."""
    latents = world_latents(components, seed, n)
    return fit_latent_rgb(latents, decode_to_unit(components, latents))


def preview_error(mapping: LatentRGB, latents: torch.Tensor, pictures: torch.Tensor) -> float:
    """Mean absolute difference, in levels of 0..255, between the preview of ``latents`` and the
    full decode ``pictures`` (in [-1, 1]) averaged over each latent cell and made 8-bit the same way."""
    cell = (pictures.shape[2] // latents.shape[2], pictures.shape[3] // latents.shape[3])
    reference = torch.clamp(F.avg_pool2d(pictures.float(), cell) * 0.5 + 0.5, 0.0, 1.0) * 255.0
    preview = mapping.to_rgb(latents).float()
    return float((preview - reference.permute(0, 2, 3, 1)).abs().mean())


def write_latent_rgb(path: str | Path, mapping: LatentRGB) -> Path:
    """Put ``mapping`` into the ``.safetensors`` file at ``path`` (replacing an earlier one): the
    header gets the metadata entry, every tensor byte stays as it was. Atomic: a reader sees the old
    file or the new one."""
    p = Path(path)
    header = read_safetensors_header(p)  # refuses a damaged file before anything is written
    data_start = min((e.offset for e in header.tensors.values()), default=None)
    with open(p, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        raw: dict[str, Any] = json.loads(f.read(header_len).decode("utf-8"))
    if data_start is not None and data_start != 8 + header_len:
        raise ModelLoadError(f"{p}: the tensors do not start right after the header; cannot rewrite it.")
    metadata = dict(header.metadata)
    metadata.update(mapping.to_metadata())
    rewritten = {"__metadata__": metadata, **{k: v for k, v in raw.items() if k != "__metadata__"}}
    encoded = json.dumps(rewritten, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data region stays 8-byte aligned, as safetensors writes it
    with PendingFile(p) as pending:
        out = pending.open()
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        with open(p, "rb") as source:
            source.seek(8 + header_len)
            shutil.copyfileobj(source, out, length=16 << 20)
        return pending.commit()


def add_preview_map(path: str | Path, *, seed: int = FIT_SEED, n: int = FIT_PICTURES) -> LatentRGB:
    """Fit the model file at ``path``'s own preview map (:func:`fit_preview_map`, on the CPU in
    float32) and store it in the file (:func:`write_latent_rgb`); returns the map."""
    components = load_model(path, device="cpu", dtype=torch.float32)
    mapping = fit_preview_map(components, seed=seed, n=n)
    write_latent_rgb(path, mapping)
    return mapping

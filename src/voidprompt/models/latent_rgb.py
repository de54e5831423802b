"""Cheap latent previews: a linear map from the latent channels straight to RGB, no VAE.

A1111's "Approx cheap" live preview (``modules/sd_vae_approx.py`` ``cheap_approximation``, then
``modules/sd_samplers_common.py`` ``single_sample_to_image``) multiplies each latent cell's channels
by a fixed matrix, one row per channel, and reads the result as a pixel in [-1, 1]:
``x * 0.5 + 0.5``, clamped to [0, 1], times 255, then cast to uint8 (truncation, not rounding). The
picture is the latent's size (1/8 of the image's side). SD1 and SDXL each have their own matrix (their
VAEs put colours in different latent directions); A1111 picks SDXL's when the model is SDXL.

A model trained from scratch (the miniature model) has latents of its own: no published matrix fits
them. :func:`fit_latent_rgb` fits one (with a bias) by least squares, and a safetensors file carries
it in its metadata under :data:`LATENT_RGB_METADATA_KEY` as JSON
``{"matrix": [[r, g, b], ...], "bias": [r, g, b]}``; :func:`latent_rgb_for` prefers a file's own map.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from voidprompt.errors import ModelLoadError
from voidprompt.models.detect import ModelFamily

__all__ = [
    "CHEAP_SD1",
    "CHEAP_SDXL",
    "LATENT_RGB_METADATA_KEY",
    "LatentRGB",
    "fit_latent_rgb",
    "latent_rgb_for",
]

LATENT_RGB_METADATA_KEY = "voidprompt.latent_rgb"

Rgb = tuple[float, float, float]


@dataclass(frozen=True)
class LatentRGB:
    """A linear latent-to-RGB map: ``rgb = latent_channels @ matrix + bias``, RGB in [-1, 1]."""

    matrix: tuple[Rgb, ...]  # one row per latent channel
    bias: Rgb = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.matrix)

    def to_rgb(self, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, C, h, w), any float dtype and device -> uint8 (B, h, w, 3) on the CPU.

        Computed in float32 on the latent's device, as A1111 computes its preview (its latents are
        float32 whatever the model's precision)."""
        if latent.ndim != 4 or latent.shape[1] != self.channels:
            raise ValueError(
                f"a latent preview needs a (batch, {self.channels}, height, width) latent, "
                f"not shape {tuple(latent.shape)}"
            )
        x = latent.to(torch.float32)
        matrix = torch.tensor(self.matrix, dtype=torch.float32, device=x.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=x.device)
        rgb = torch.einsum("bchw,cr->bhwr", x, matrix) + bias
        pixels = torch.clamp(rgb * 0.5 + 0.5, min=0.0, max=1.0) * 255.0
        return pixels.to(device="cpu", dtype=torch.uint8)

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata entry that :meth:`from_metadata` reads back."""
        value = {"matrix": [list(row) for row in self.matrix], "bias": list(self.bias)}
        return {LATENT_RGB_METADATA_KEY: json.dumps(value)}

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, str] | None, *, source: str, channels: int
    ) -> LatentRGB | None:
        """A file's own map (None when its metadata has no :data:`LATENT_RGB_METADATA_KEY`);
        ``channels`` is the model's latent channel count, one matrix row each."""
        if not metadata or LATENT_RGB_METADATA_KEY not in metadata:
            return None
        where = f"{source}: metadata '{LATENT_RGB_METADATA_KEY}'"
        fix = "fix it or remove the key (previews then use the family's fixed factors)"
        try:
            data = json.loads(metadata[LATENT_RGB_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{where} is not valid JSON ({exc}); {fix}.") from None
        expected = f'{{"matrix": [[r, g, b] x {channels}], "bias": [r, g, b]}}'
        if not isinstance(data, dict) or set(data) - {"matrix", "bias"} or "matrix" not in data:
            raise ModelLoadError(f"{where} must be a JSON object {expected}; {fix}.")
        rows = data["matrix"]
        if not isinstance(rows, list) or len(rows) != channels:
            count = len(rows) if isinstance(rows, list) else "no"
            raise ModelLoadError(
                f"{where}: 'matrix' has {count} rows but the model's latents have {channels} "
                f"channels (one row each); {fix}."
            )
        matrix = tuple(_rgb(row, f"{where}: matrix row {i}", fix) for i, row in enumerate(rows))
        bias = _rgb(data.get("bias", [0.0, 0.0, 0.0]), f"{where}: 'bias'", fix)
        return cls(matrix=matrix, bias=bias)


def _rgb(value: Any, where: str, fix: str) -> Rgb:
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(math.isfinite(v) for v in value)
    ):
        raise ModelLoadError(f"{where} must be 3 finite numbers (red, green, blue), not {value!r:.60}; {fix}")
    return (float(value[0]), float(value[1]), float(value[2]))


# A1111's "Approx cheap" factors. SD1's are the widely shared ones (Hugging Face forum, "decoding
# latents to RGB without upscaling"); SDXL's VAE puts colours elsewhere and has its own.
CHEAP_SD1 = LatentRGB(
    matrix=((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
)
CHEAP_SDXL = LatentRGB(
    matrix=(
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    )
)


class _PreviewFacts(Protocol):
    """What :func:`latent_rgb_for` reads of :class:`voidprompt.models.components.Components`."""

    @property
    def family(self) -> ModelFamily: ...

    @property
    def latent_rgb(self) -> LatentRGB | None: ...


def latent_rgb_for(components: _PreviewFacts) -> LatentRGB:
    """The cheap preview map of a loaded model: its file's own fitted map when it carries one, else
    A1111's factors for its family (SDXL's for every SDXL family, SD1's otherwise)."""
    if components.latent_rgb is not None:
        return components.latent_rgb
    return CHEAP_SDXL if components.family.is_sdxl else CHEAP_SD1


def fit_latent_rgb(latents: torch.Tensor, pixels: torch.Tensor) -> LatentRGB:
    """The least-squares map (with bias) from latents (N, C, h, w) to pictures (N, 3, H, W) in [-1, 1].

    Each picture is averaged over every latent cell's area (H / h by W / w pixels) first, so the map
    predicts the cell's mean colour: what a preview pixel stands for. Solved in float64."""
    if latents.ndim != 4 or pixels.ndim != 4 or pixels.shape[1] != 3 or latents.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"fit_latent_rgb needs latents (N, C, h, w) and pictures (N, 3, H, W), not "
            f"{tuple(latents.shape)} and {tuple(pixels.shape)}"
        )
    _, c, h, w = latents.shape
    if pixels.shape[2] % h or pixels.shape[3] % w:
        raise ValueError(f"pictures of {pixels.shape[2]}x{pixels.shape[3]} do not tile a {h}x{w} latent grid")
    cells = F.avg_pool2d(pixels.to(torch.float64), (pixels.shape[2] // h, pixels.shape[3] // w))
    x = latents.to(torch.float64).permute(0, 2, 3, 1).reshape(-1, c)
    y = cells.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    if design.shape[0] < c + 1:
        raise ValueError(f"fit_latent_rgb needs at least {c + 1} latent cells, got {design.shape[0]}")
    # gelsd: a minimum-norm answer even when a channel is constant (it and the bias then coincide).
    solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
    rows = solution.tolist()
    return LatentRGB(
        matrix=tuple((float(r[0]), float(r[1]), float(r[2])) for r in rows[:c]),
        bias=(float(rows[c][0]), float(rows[c][1]), float(rows[c][2])),
    )

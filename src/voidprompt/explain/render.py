"""Pictures of an explanation: a heatmap over the picture, and strips of previews.

One colour map (a perceptually ordered dark-to-bright ramp, black - purple - orange - yellow, close
to matplotlib's "inferno"), so that the sheet, the report and the web UI show the same colours
without needing matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

# Anchor colours of the ramp at 0, 0.25, 0.5, 0.75 and 1; linear in between.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colorize(heat: np.ndarray, *, vmax: float | None = None) -> np.ndarray:
    """A (h, w) map as (h, w, 3) uint8 colours, 0 -> black and ``vmax`` (default: the map's maximum)
    -> bright yellow; NaN cells are black."""
    values = np.nan_to_num(heat.astype(np.float64), nan=0.0)
    top = float(values.max()) if vmax is None else float(vmax)
    t = np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)
    position = t * (len(_RAMP) - 1)
    low = np.minimum(position.astype(int), len(_RAMP) - 2)
    frac = (position - low)[..., None]
    colours = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac
    return np.rint(colours).astype(np.uint8)


def overlay(
    picture: Image.Image, heat: np.ndarray, *, alpha: float = 0.6, vmax: float | None = None
) -> Image.Image:
    """The heatmap, upsampled smoothly to the picture's size, blended over it (``alpha``: its weight)."""
    colours = Image.fromarray(colorize(heat, vmax=vmax)).resize(picture.size, Image.Resampling.BILINEAR)
    return Image.blend(picture.convert("RGB"), colours, alpha)


def upscale(pixels: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A small (h, w, 3) uint8 preview shown at ``size`` (width, height) with visible cells."""
    return Image.fromarray(pixels).resize(size, Image.Resampling.NEAREST)


def strip(images: Sequence[Image.Image], *, gap: int = 2) -> Image.Image:
    """Images side by side on a white ground, top-aligned."""
    if not images:
        raise ValueError("a strip needs at least one image")
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    out = Image.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return out

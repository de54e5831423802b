"""Image measures for studies: brightness, contrast, colour, detail, and how many things are shown.

Every measure takes an RGB float array in 0..1 (height x width x 3) and returns a float.
Luminance here is Rec. 709 luma on the sRGB-encoded values (no linearisation): it tracks the
brightness a viewer reports and is what the study brief's "CFG -> brightness" is about; it is not
photometric luminance. ``measure_image`` accepts PIL images and uint8 arrays too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from voidprompt.errors import VoidpromptError

FloatImage = NDArray[np.float64]
Measure = Callable[[FloatImage], float]

REC709 = (0.2126, 0.7152, 0.0722)


def as_rgb(image: Any) -> FloatImage:
    """An RGB float64 array in 0..1 from a PIL image, a uint8 array or a float array in 0..1."""
    if hasattr(image, "convert") and hasattr(image, "size"):
        array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    else:
        raw = np.asarray(image)
        if raw.dtype == np.uint8:
            array = raw.astype(np.float64) / 255.0
        elif np.issubdtype(raw.dtype, np.floating):
            array = raw.astype(np.float64)
            if array.size and (array.min() < 0.0 or array.max() > 1.0):
                raise VoidpromptError(
                    f"a float image must hold values in 0..1, got {array.min():.3g}..{array.max():.3g}; "
                    "divide uint8 data by 255 or pass it as uint8"
                )
        else:
            raise VoidpromptError(f"image dtype {raw.dtype}: pass uint8 (0..255) or float (0..1) data")
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        elif array.ndim == 3 and array.shape[2] in (3, 4):
            array = array[..., :3]  # alpha does not change what the image shows
        else:
            raise VoidpromptError(f"image shape {raw.shape}: expected height x width x 3 (RGB)")
    if array.shape[0] < 3 or array.shape[1] < 3:
        raise VoidpromptError(
            f"image of {array.shape[1]}x{array.shape[0]} px is too small to measure (min 3x3)"
        )
    return array


def luma(rgb: FloatImage) -> FloatImage:
    weights = np.asarray(REC709, dtype=np.float64)
    return np.asarray(rgb @ weights, dtype=np.float64)


def mean_luminance(rgb: FloatImage) -> float:
    """Mean Rec. 709 luma of the sRGB values, 0 (black) .. 1 (white)."""
    return float(luma(rgb).mean())


def rms_contrast(rgb: FloatImage) -> float:
    """Standard deviation of luma (Peli 1990's RMS contrast), 0 .. 0.5."""
    return float(luma(rgb).std())


def mean_saturation(rgb: FloatImage) -> float:
    """Mean HSV saturation (max - min) / max; black pixels count as 0."""
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return float(saturation.mean())


def colourfulness(rgb: FloatImage) -> float:
    """Hasler and Süsstrunk (2003) M = sigma_rgyb + 0.3 mu_rgyb, on the paper's 0..255 scale."""
    r, g, b = (rgb[..., i] * 255.0 for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    sigma = np.sqrt(rg.var() + yb.var())
    mu = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(sigma + 0.3 * mu)


def sobel_magnitude(y: FloatImage) -> FloatImage:
    """Sobel gradient magnitude on the interior pixels (a 0 -> 1 step gives 4)."""
    gx = (y[:-2, 2:] + 2 * y[1:-1, 2:] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[1:-1, :-2] + y[2:, :-2])
    gy = (y[2:, :-2] + 2 * y[2:, 1:-1] + y[2:, 2:]) - (y[:-2, :-2] + 2 * y[:-2, 1:-1] + y[:-2, 2:])
    return np.asarray(np.hypot(gx, gy), dtype=np.float64)


def edge_density(rgb: FloatImage, threshold: float = 0.5) -> float:
    """Share of interior pixels whose Sobel magnitude on luma exceeds ``threshold``.

    0.5 is a luma step of 1/8 across the kernel: faint texture is not an edge, a drawn line is.
    """
    return float((sobel_magnitude(luma(rgb)) > threshold).mean())


def high_frequency_energy(rgb: FloatImage, cutoff: float = 0.25) -> float:
    """Share of the luma spectrum's power (DC excluded) above ``cutoff`` cycles per pixel.

    0.5 cycles/pixel is the Nyquist limit along an axis; a flat image has no power and gives 0.
    """
    y = luma(rgb)
    power = np.abs(np.fft.fft2(y - y.mean())) ** 2
    fy = np.fft.fftfreq(y.shape[0])[:, None]
    fx = np.fft.fftfreq(y.shape[1])[None, :]
    total = power.sum()
    if total <= 1e-12 * y.size:
        return 0.0
    return float(power[np.hypot(fx, fy) > cutoff].sum() / total)


def background_colour(rgb: FloatImage) -> NDArray[np.float64]:
    """The median colour of the border pixels: generated subjects rarely fill all four edges."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.asarray(np.median(border, axis=0), dtype=np.float64)


def label_components(mask: NDArray[np.bool_]) -> tuple[NDArray[np.int64], int]:
    """4-connected components of ``mask``: (labels, count), labels 1..count and 0 for background."""
    labels, count = ndimage.label(mask)
    return np.asarray(labels, dtype=np.int64), int(count)


def salient_regions(rgb: FloatImage, threshold: float = 0.25, min_area: int | None = None) -> float:
    """How many distinct things stand out: connected regions far from the background colour.

    A pixel is salient when its RGB distance to the border's median colour exceeds ``threshold``
    (0..sqrt(3)); regions are 4-connected and count when they have at least ``min_area`` pixels
    (default: 0.2% of the image, at least 4), so noise specks are not objects.
    """
    distance = np.sqrt(((rgb - background_colour(rgb)) ** 2).sum(axis=2))
    labels, count = label_components(distance > threshold)
    if count == 0:
        return 0.0
    smallest = min_area if min_area is not None else max(4, rgb.shape[0] * rgb.shape[1] // 500)
    sizes = np.bincount(labels.ravel())[1:]
    return float((sizes >= smallest).sum())


def default_measures() -> dict[str, Measure]:
    """A fresh registry of the standard measures; add your own to the copy you pass on."""
    return {
        "luminance": mean_luminance,
        "contrast": rms_contrast,
        "saturation": mean_saturation,
        "colourfulness": colourfulness,
        "edge_density": edge_density,
        "high_frequency_energy": high_frequency_energy,
        "salient_regions": salient_regions,
    }


# Read-only view: plug-ins extend a copy (default_measures()), never this module's state.
MEASURES: Mapping[str, Measure] = MappingProxyType(default_measures())


def measure_image(
    image: Any, names: Iterable[str] | None = None, registry: Mapping[str, Measure] | None = None
) -> dict[str, float]:
    """Run measures (all of ``registry``, or the ``names`` given) on one image."""
    measures = MEASURES if registry is None else registry
    chosen = list(measures) if names is None else list(names)
    unknown = [n for n in chosen if n not in measures]
    if unknown:
        raise VoidpromptError(f"unknown measure(s) {', '.join(unknown)}; available: {', '.join(measures)}")
    rgb = as_rgb(image)
    return {name: float(measures[name](rgb)) for name in chosen}

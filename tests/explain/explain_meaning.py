"""What the slow meaning tests measure: where the miniature model's pictures put a prompted shape
(the detector's own regions), and how a captured map lines up with it.

The detector (:func:`voidprompt.demo.detector.detect`) reports each shape's kind, colour, box and
area, not its pixels. :func:`shape_regions` repeats the detector's own steps up to the shapes (the
background fit, the foreground threshold, the opened core, the regrowth) one seed at a time, so that
each region is the very pixel set the detector measured; it checks every region against the
detector's report (same kind, colour, box and area) and fails loudly if they ever drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from voidprompt.demo import detector as det

TOP_FRACTION = 0.10


@dataclass(frozen=True)
class Region:
    shape: det.DetectedShape
    mask: np.ndarray  # (H, W) bool, picture pixels


def shape_regions(image: Image.Image, config: det.DetectorConfig) -> list[Region]:
    """Every shape the detector finds in ``image``, with its pixels."""
    detection = det.detect(image, config)
    unit = config.unit
    rgb = np.asarray(image.convert("RGB")).astype(np.float64) / 255.0
    # The detector's own foreground and shape cores (detect(), steps 1-2).
    a, b = (np.array(end) for end in detection.background.ends)
    dist, _ = det._segment_distance(rgb, a, b)
    fg = dist > config.fg_threshold
    peak = ndimage.maximum_filter(dist, 2 * max(2, round(3 * unit)) + 1)
    strong = fg & (dist > 0.5 * peak)
    core = det._opened(strong, det._disk(max(1, round(2 * unit))))
    labels, count = ndimage.label(core)
    min_area = config.min_shape_area * unit * unit
    regions = []
    for i in range(1, count + 1):
        found, claimed = det._find_shapes(rgb, fg, (labels == i).astype(labels.dtype), unit, min_area)
        if found:
            regions.append(Region(found[0], claimed))
    regions.sort(key=lambda r: (r.shape.centre[1], r.shape.centre[0]))
    reported = [r.shape for r in regions]
    if reported != detection.shapes:
        raise AssertionError(
            f"the regions rebuilt from the detector's steps ({reported}) are not the shapes it "
            f"reports ({detection.shapes}): voidprompt.demo.detector.detect changed; update shape_regions"
        )
    return regions


def prompted_mask(
    image: Image.Image, config: det.DetectorConfig, colour: str, kind: str
) -> np.ndarray | None:
    """The pixels of every detected ``<colour> <kind>`` shape, or None when the picture has none."""
    regions = shape_regions(image, config)
    masks = [r.mask for r in regions if r.shape.colour == colour and r.shape.kind == kind]
    if not masks:
        return None
    return np.logical_or.reduce(masks)


def to_picture(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A latent-resolution map upsampled bilinearly to the picture's (H, W), as the overlay shows it."""
    t = torch.from_numpy(np.nan_to_num(heat.astype(np.float32)))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def top_cells(heat: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """The ``fraction`` of cells where ``heat`` is highest (ties broken by position), as a mask."""
    flat = heat.ravel()
    k = max(1, round(fraction * flat.size))
    chosen = np.argsort(-flat, kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[chosen] = True
    return mask.reshape(heat.shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def inside_minus_outside(heat: np.ndarray, mask: np.ndarray) -> float:
    """Mean of ``heat`` over the mask's pixels minus its mean over the rest."""
    return float(heat[mask].mean() - heat[~mask].mean())


def partners(groups: Sequence[str]) -> list[int]:
    """For each item, the next item of the same group (cyclically): another seed of the same prompt."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    out = [0] * len(groups)
    for members in by_group.values():
        if len(members) < 2:
            raise ValueError(f"a group needs two items to pair, got {members}")
        for k, index in enumerate(members):
            out[index] = members[(k + 1) % len(members)]
    return out

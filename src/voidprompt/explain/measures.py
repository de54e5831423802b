"""Numbers from an explanation, for catalogs and plots.

Per tag and window:
- ``mass_share``: the tag's share of the attention its prompt's tags get, summed over the picture
  (a branch / AND sub-prompt's tags share 1; the start, end, padding and comma rows are left out:
  the start token alone takes most of every query's attention);
- ``peak_y`` / ``peak_x``: where the tag's map is highest, as fractions of the picture's height and
  width (cell centres);
- ``spread``: the entropy of the tag's map as a distribution over the picture, divided by the
  entropy of a uniform one (1: spread evenly, near 0: one spot).
Per window, ``guidance_difference``: the mean over the window's calls of the mean absolute
difference between the cond and uncond predictions of the clean latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from voidprompt.explain.record import Explanation


@dataclass(frozen=True)
class TagMeasure:
    tag: str
    branch: str
    part: int
    label: str
    weight: float
    window: str
    mass_share: float
    peak_y: float
    peak_x: float
    spread: float


def tag_measures(explanation: Explanation, windows: tuple[str, ...] | None = None) -> list[TagMeasure]:
    """Every tag's measures in every window (or the ``windows`` named) where its branch ran."""
    out: list[TagMeasure] = []
    chosen = explanation.windows if windows is None else windows
    for window in chosen:
        w = explanation.window_index(window)
        maps = explanation.tag_maps[:, w]
        mass = np.nansum(maps.reshape(maps.shape[0], -1), axis=1) if maps.size else np.zeros(0)
        groups: dict[tuple[str, int], float] = {}
        for tag, m in zip(explanation.tags, mass, strict=True):
            groups[(tag.branch, tag.part)] = groups.get((tag.branch, tag.part), 0.0) + float(m)
        for i, tag in enumerate(explanation.tags):
            heat = maps[i]
            if np.isnan(heat).all():
                continue
            total = groups[(tag.branch, tag.part)]
            peak_y, peak_x = peak(heat)
            out.append(
                TagMeasure(
                    tag=tag.key,
                    branch=tag.branch,
                    part=tag.part,
                    label=tag.label,
                    weight=tag.weight,
                    window=window,
                    mass_share=float(mass[i]) / total if total > 0 else float("nan"),
                    peak_y=peak_y,
                    peak_x=peak_x,
                    spread=spread(heat),
                )
            )
    return out


def peak(heat: np.ndarray) -> tuple[float, float]:
    """(y, x) of the map's maximum as fractions of its height and width, at the cell's centre."""
    y, x = np.unravel_index(int(np.nanargmax(heat)), heat.shape)
    return float((y + 0.5) / heat.shape[0]), float((x + 0.5) / heat.shape[1])


def spread(heat: np.ndarray) -> float:
    """Normalised entropy of a non-negative map: 1 for a uniform map, 0 for a single cell."""
    values = np.clip(np.nan_to_num(heat.astype(np.float64).ravel()), 0.0, None)
    total = values.sum()
    if values.size < 2 or total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum() / math.log(values.size))


def guidance_differences(explanation: Explanation) -> dict[str, float]:
    """Per window, the mean guidance difference of its calls that ran both branches (NaN if none)."""
    out = {}
    for window in explanation.windows:
        values = [
            difference
            for c in explanation.window_calls[window]
            if (difference := explanation.calls[c].guidance_difference) is not None
        ]
        out[window] = float(np.mean(values)) if values else float("nan")
    return out

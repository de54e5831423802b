"""Small statistics for study reports: Wilson intervals, outcome tables, a slope with its CI.

Wilson intervals instead of the normal approximation because the study brief's batches are small
(20 images) and its proportions often sit at 0 or near 1, where p +- z*sqrt(p(1-p)/n) collapses
to a zero-width interval or leaves [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

from scipy.stats import t as student_t

from voidprompt.errors import VoidpromptError


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise VoidpromptError(f"confidence={confidence}: must be between 0 and 1, e.g. 0.95")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3).

    ``trials == 0`` carries no information and gives (0, 1).
    """
    if trials < 0 or not 0 <= successes <= max(trials, 0):
        raise VoidpromptError(f"successes={successes}, trials={trials}: need 0 <= successes <= trials")
    if trials == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials))
    # Clamp float noise at the edges: the exact interval for 0 successes starts at 0.
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ProportionRow:
    group: Hashable
    outcome: Hashable
    count: int
    total: int
    proportion: float
    low: float
    high: float


def proportion_table(
    counts: Mapping[Hashable, Mapping[Hashable, int]],
    outcomes: Sequence[Hashable] | None = None,
    confidence: float = 0.95,
) -> list[ProportionRow]:
    """Rows of (group, outcome, count, total, proportion, Wilson interval).

    ``counts[group][outcome]`` like the study brief's table (size -> Pattern / Object or Scenery / ...);
    ``outcomes`` fixes the column order and adds zero rows for outcomes a group never had.
    """
    if outcomes is None:
        outcomes = list(dict.fromkeys(o for row in counts.values() for o in row))
    rows = []
    for group, row in counts.items():
        total = sum(row.values())
        for outcome in outcomes:
            k = row.get(outcome, 0)
            low, high = wilson_interval(k, total, confidence)
            rows.append(ProportionRow(group, outcome, k, total, k / total if total else math.nan, low, high))
    return rows


@dataclass(frozen=True)
class SlopeFit:
    slope: float
    intercept: float
    stderr: float
    low: float
    high: float
    n: int


def linear_slope(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> SlopeFit:
    """Least-squares slope of y on x with a t-distribution confidence interval (n - 2 dof).

    For "does the rate change with W": a slope interval that excludes 0 is the claim.
    """
    n = len(x)
    if n != len(y):
        raise VoidpromptError(f"x has {n} values but y has {len(y)}; pass one y per x")
    if n < 3:
        raise VoidpromptError(f"a slope interval needs at least 3 points, got {n}")
    if not 0.0 < confidence < 1.0:
        raise VoidpromptError(f"confidence={confidence}: must be between 0 and 1, e.g. 0.95")
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    if sxx == 0:
        raise VoidpromptError("all x values are equal; a slope needs at least two different x values")
    sxy = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    sse = sum((yi - intercept - slope * xi) ** 2 for xi, yi in zip(x, y, strict=True))
    stderr = math.sqrt(sse / (n - 2) / sxx)
    half = float(student_t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 2)) * stderr
    return SlopeFit(slope, intercept, stderr, slope - half, slope + half, n)

"""The report's table: one row per image with its axis values, derived size columns, measures, label."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy.stats import t as student_t

from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.labels import effective_label
from voidprompt.lab.measures import MEASURES
from voidprompt.lab.selection import select
from voidprompt.lab.study import Study

__all__ = ["DERIVED", "SEED_AXES", "ReportData", "collect", "mean_ci", "outcome_counts", "select"]

SEED_AXES = ("seed", "seeds")
DERIVED = ("area", "aspect")


@dataclass(frozen=True)
class ReportData:
    rows: list[dict[str, Any]]
    axes: list[str]  # the study's axis names in study order, seed included
    measures: list[str]
    base: int  # side of the unit area (area = width * height / base^2)
    # Per-tag attention measures of the images with an explanation (Catalog.all_tag_measures).
    tag_rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def factors(self) -> list[str]:
        """Axes that are not seeds: what a plot or table is split by."""
        return [a for a in self.axes if a not in SEED_AXES]

    def values(self, column: str, rows: Iterable[Mapping[str, Any]] | None = None) -> list[Any]:
        """Distinct values of ``column``: numbers sorted, anything else in study order."""
        seen = list(dict.fromkeys(r.get(column) for r in (self.rows if rows is None else rows)))
        seen = [v for v in seen if v is not None]
        if seen and all(isinstance(v, int | float) and not isinstance(v, bool) for v in seen):
            return sorted(seen)
        return seen

    def check_column(self, column: str, where: str) -> None:
        known = [*self.axes, *DERIVED, *self.measures, "label", "width", "height"]
        if column not in known:
            raise StudyError(f"[report] {where} = {column!r}: not a column; choose one of {', '.join(known)}")


def collect(catalog: Catalog, study: Study, base: int) -> ReportData:
    measures = catalog.all_measures()
    labels = catalog.all_labels()
    rows = []
    axes: dict[str, None] = {}
    for image in catalog.images():
        axis_values = {k: v for k, v in image["axis_values"].items() if not k.endswith("_spec")}
        axes.update(dict.fromkeys(axis_values))
        label, source = effective_label(labels.get(image["id"], {}))
        row = {
            "image_id": image["id"],
            "job_id": image["job_id"],
            "path": image["path"],
            "width": image["width"],
            "height": image["height"],
            "seed": image["seed"],
            **axis_values,
            "area": round(image["width"] * image["height"] / (base * base), 6),
            "aspect": round(image["width"] / image["height"], 6),
            **measures.get(image["id"], {}),
            "label": label,
            "label_source": source,
            "explanation": image.get("explanation"),
        }
        rows.append(row)
    names = [m for m in MEASURES if any(m in r for r in rows)]
    names += sorted({k for m in measures.values() for k in m} - set(names))
    return ReportData(rows, list(axes), names, base, catalog.all_tag_measures())


def mean_ci(values: Sequence[float | None], confidence: float = 0.95) -> tuple[float, float, float, int]:
    """(mean, low, high, n) with a Student-t interval; n < 2 gives a zero-width interval."""
    clean = [v for v in values if v is not None and not math.isnan(v)]
    n = len(clean)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = sum(clean) / n
    if n < 2:
        return mean, mean, mean, n
    sd = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half, n


def outcome_counts(
    data: ReportData, by: str, classes: Sequence[str], where: Mapping[str, Any] | None = None
) -> dict[Hashable, dict[Hashable, int]]:
    """counts[group][class] over labelled images matching ``where`` (others are left out)."""
    rows = select(data.rows, where or {})
    counts: dict[Hashable, dict[Hashable, int]] = {}
    for value in data.values(by, rows):
        counts[value] = dict.fromkeys(classes, 0)
    for row in rows:
        if row["label"] in classes and row.get(by) is not None:
            counts[row[by]][row["label"]] += 1
    return counts

"""The report's view of captured explanations against one axis: which tags to show, a per-image
table of their attention measures for the existing plots, and the grid of tag heatmaps.

A heatmap cell is the mean of the tag's map over the images (seeds) at that axis value, drawn with
:func:`voidprompt.explain.render.overlay` over the first of those pictures; a row shares one colour
scale across its cells, so a tag that draws more attention at one value shows brighter there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from voidprompt.explain.record import Explanation
from voidprompt.explain.render import overlay
from voidprompt.explain.store import load_explanation
from voidprompt.lab.catalog import GUIDANCE_MEASURE
from voidprompt.lab.report.data import ReportData, select
from voidprompt.lab.report.figures import CELL, empty_cell, grid_canvas, label_margin, paste_in_cell
from voidprompt.lab.schema import ExplainView

# The per-tag measures a view plots against its axis.
TAG_MEASURES = ("mass_share", "spread")
TAG_LABEL_CHARS = 24


def captured_rows(data: ReportData, where: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The images matching ``where`` that have an explanation file."""
    return [r for r in select(data.rows, where) if r.get("explanation")]


def tag_rows(
    data: ReportData, images: Sequence[Mapping[str, Any]], view: ExplainView
) -> list[dict[str, Any]]:
    """The tag measures of ``images`` in the view's window (and branch)."""
    ids = {r["image_id"] for r in images}
    return [
        t
        for t in data.tag_rows
        if t["image_id"] in ids and t["window"] == view.window and (view.branch in (None, t["branch"]))
    ]


def top_tags(rows: Sequence[Mapping[str, Any]], count: int) -> list[str]:
    """The ``count`` tag keys with the largest mean mass share (ties: first seen first)."""
    shares: dict[str, list[float]] = {}
    for t in rows:
        value = t["mass_share"]
        shares.setdefault(t["tag"], [])
        if value is not None and not math.isnan(value):
            shares[t["tag"]].append(float(value))
    means = {tag: (sum(v) / len(v) if v else -math.inf) for tag, v in shares.items()}
    return sorted(means, key=lambda tag: -means[tag])[:count]


def tag_table(
    data: ReportData,
    images: Sequence[Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    tags: Sequence[str],
) -> ReportData:
    """One row per image and tag (``tags`` only): the image's columns, ``tag`` and the tag's
    :data:`TAG_MEASURES`, so the measure plots and trends read them split by ``tag``."""
    by_image = {image["image_id"]: image for image in images}
    wanted = set(tags)
    table = [
        {**by_image[t["image_id"]], "tag": t["tag"], **{m: t[m] for m in TAG_MEASURES}}
        for t in rows
        if t["tag"] in wanted and t["image_id"] in by_image
    ]
    table.sort(key=lambda r: tags.index(r["tag"]))  # the legend lists the tags by attention share
    return ReportData(table, data.axes, list(TAG_MEASURES), data.base)


def guidance_table(
    data: ReportData, images: Sequence[Mapping[str, Any]], windows: Sequence[str]
) -> ReportData:
    """One row per image and step window: the image's columns, ``window`` and its guidance difference
    (the image's ``guidance_difference_<window>`` measure)."""
    table = [
        {**image, "window": w, GUIDANCE_MEASURE: image[f"{GUIDANCE_MEASURE}_{w}"]}
        for w in windows
        for image in images
        if f"{GUIDANCE_MEASURE}_{w}" in image
    ]
    return ReportData(table, data.axes, [GUIDANCE_MEASURE] if table else [], data.base)


def heatmap_grid(
    data: ReportData,
    folder: Path,
    images: Sequence[Mapping[str, Any]],
    view: ExplainView,
    tags: Sequence[str],
    title: str,
) -> Image.Image:
    """Rows = ``tags``, columns = values of ``view.x``: each cell the tag's mean map over the images
    at that value, over the first of their pictures that has it; an empty cell (no such map) is grey."""
    xs = data.values(view.x, images)
    loaded: dict[int, Explanation] = {}

    def explanation(row: Mapping[str, Any]) -> Explanation:
        if row["image_id"] not in loaded:
            loaded[row["image_id"]] = load_explanation(folder / row["explanation"])
        return loaded[row["image_id"]]

    cells: dict[tuple[int, int], tuple[Path, np.ndarray]] = {}
    for i, value in enumerate(xs):
        at = select(images, {view.x: value})
        for j, tag in enumerate(tags):
            maps = [(row, _tag_map(explanation(row), tag, view.window)) for row in at]
            found = [(row, m) for row, m in maps if m is not None]
            if not found:
                continue
            representative, first = found[0]
            # A picture of another size (another map shape) does not average in.
            same = [m for _, m in found if m.shape == first.shape]
            cells[(i, j)] = (folder / representative["path"], np.mean(np.stack(same), axis=0))
    labels = [t if len(t) <= TAG_LABEL_CHARS else t[: TAG_LABEL_CHARS - 3] + "..." for t in tags]
    left = max(80, label_margin(labels))
    canvas, draw, top = grid_canvas(title, view.x, xs, labels, left)
    for j in range(len(tags)):
        row_cells = [cells[(i, j)][1] for i in range(len(xs)) if (i, j) in cells]
        vmax = max((float(np.nanmax(m)) for m in row_cells if np.isfinite(m).any()), default=0.0)
        for i in range(len(xs)):
            box = (left + i * CELL, top + j * CELL)
            if (i, j) not in cells:
                empty_cell(draw, box)
                continue
            picture_path, heat = cells[(i, j)]
            with Image.open(picture_path) as picture:
                shown = overlay(picture.convert("RGB"), heat, vmax=vmax if vmax > 0 else None)
            smooth = Image.Resampling.BILINEAR
            paste_in_cell(canvas, box, shown, up=smooth, down=smooth)
    return canvas


def _tag_map(explanation: Explanation, tag: str, window: str) -> np.ndarray | None:
    try:
        heat = explanation.tag_maps[explanation.tag_index(tag), explanation.window_index(window)]
    except KeyError:
        return None
    return None if np.isnan(heat).all() else heat

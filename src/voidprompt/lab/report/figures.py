"""Figures: A1111-style X/Y image grids (PIL) and measure / outcome plots (matplotlib, Agg).

matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` only, never pyplot, so a report
touches no global backend state and runs headless.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from voidprompt.errors import require_extra
from voidprompt.lab.report.data import ReportData, mean_ci, select
from voidprompt.lab.stats import ProportionRow

CELL = 128  # longest side of a grid cell in pixels; small images are scaled up (nearest)
LABEL_H = 20
BORDER = (150, 150, 150)  # the line around each cell, so neighbouring pictures do not run together


def label_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at a readable size (no file is looked up); the tiny bitmap font where
    Pillow was built without FreeType."""
    try:
        return ImageFont.load_default(size=13)
    except (ImportError, OSError):
        return ImageFont.load_default()


def label_margin(labels: Sequence[str]) -> int:
    """The left margin that fits the row labels (each line measured in the label font)."""
    font = label_font()
    widest = max((font.getlength(line) for label in labels for line in label.split("\n")), default=0)
    return max(60, int(widest) + 12)


def grid_canvas(
    title: str, x: str, xs: Sequence[Any], row_labels: Sequence[str], left: int
) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    """A white grid page: the title, ``x`` and its values over the columns, a label per row (a
    ``left``-pixel margin). Returns the canvas, its drawing and the top of the first row: cell (i, j)
    is at (left + i * CELL, top + j * CELL)."""
    top = LABEL_H * 3 + 4
    canvas = Image.new("RGB", (left + CELL * len(xs), top + CELL * len(row_labels)), "white")
    draw = ImageDraw.Draw(canvas)
    font = label_font()
    draw.text((4, 2), title, fill="black", font=font)
    # ASCII only: the default bitmap font has no arrow glyph.
    draw.text((left, LABEL_H), f"{x} ->", fill="black", font=font)
    for i, xv in enumerate(xs):
        draw.text((left + i * CELL + 4, LABEL_H * 2), str(xv), fill="black", font=font)
    for j, label in enumerate(row_labels):
        draw.text((4, top + j * CELL + 4), label, fill="black", font=font)
    for i, j in itertools.product(range(len(xs)), range(len(row_labels))):
        x0, y0 = left + i * CELL, top + j * CELL
        draw.rectangle((x0, y0, x0 + CELL - 1, y0 + CELL - 1), outline=BORDER)
    return canvas, draw, top


def empty_cell(draw: ImageDraw.ImageDraw, box: tuple[int, int]) -> None:
    draw.rectangle((box[0] + 2, box[1] + 2, box[0] + CELL - 3, box[1] + CELL - 3), fill=(200, 200, 200))


def paste_in_cell(
    canvas: Image.Image,
    box: tuple[int, int],
    picture: Image.Image,
    *,
    up: Image.Resampling = Image.Resampling.NEAREST,
    down: Image.Resampling = Image.Resampling.LANCZOS,
) -> None:
    """``picture`` scaled to fit the cell at ``box`` (``up`` / ``down`` resampling), centred."""
    scale = (CELL - 4) / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, up if scale >= 1 else down)
    canvas.paste(picture, (box[0] + (CELL - size[0]) // 2, box[1] + (CELL - size[1]) // 2))


def image_grid(
    data: ReportData,
    folder: Path,
    x: str,
    y: str,
    fixed: Mapping[str, Any],
    title: str,
    *,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> Image.Image:
    """One page: columns = values of ``x``, rows = values of ``y``, other factors fixed to ``fixed``.

    ``rows`` narrows the images first (a selection or a page of it). A cell shows the first image
    (in study order) of its combination; an empty cell is grey.
    """
    rows = select(data.rows if rows is None else rows, fixed)
    xs, ys = data.values(x, rows), data.values(y, rows)
    labels = [f"{y}=\n{yv}" for yv in ys]
    left = label_margin(labels)
    canvas, draw, top = grid_canvas(title, x, xs, labels, left)
    for (i, xv), (j, yv) in itertools.product(enumerate(xs), enumerate(ys)):
        cell = select(rows, {x: xv, y: yv})
        box = (left + i * CELL, top + j * CELL)
        if not cell:
            empty_cell(draw, box)
            continue
        with Image.open(folder / cell[0]["path"]) as image:
            thumb = image.convert("RGB")
        paste_in_cell(canvas, box, thumb)
    return canvas


def _new_figure(width: float, height: float) -> Any:
    require_extra("matplotlib", "lab", "a study report's figures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, stem: Path) -> tuple[Path, Path]:
    """Write ``stem``.png and ``stem``.svg; returns both paths."""
    png, svg = stem.with_suffix(".png"), stem.with_suffix(".svg")
    figure.savefig(png)
    # The constrained layout was solved for the PNG; keep it for the SVG instead of solving it again
    # (half of a figure's drawing time).
    figure.set_layout_engine("none")
    figure.savefig(svg, metadata={"Date": None})  # no timestamp: reruns give the same file
    return png, svg


def measure_plot(
    data: ReportData,
    measures: Sequence[str],
    x: str,
    split: str | None,
    where: Mapping[str, Any],
) -> tuple[Any, list[dict[str, Any]]]:
    """Each measure's mean ± 95% CI against ``x``, one line per value of ``split``.

    Returns the figure and its numbers (one row per measure, split value and x value).
    """
    rows = select(data.rows, where)
    xs = data.values(x, rows)
    numeric = all(isinstance(v, int | float) for v in xs)
    positions = {v: (float(v) if numeric else float(i)) for i, v in enumerate(xs)}
    groups = data.values(split, rows) if split else [None]
    columns = min(3, len(measures))
    lines = (len(measures) + columns - 1) // columns
    figure = _new_figure(4.2 * columns, 3.2 * lines)
    axes = figure.subplots(lines, columns, squeeze=False)
    table = []
    for index, measure in enumerate(measures):
        ax = axes[index // columns][index % columns]
        offset_step = 0.0 if numeric or len(groups) < 2 else 0.6 / len(groups)
        for g, group in enumerate(groups):
            chosen = select(rows, {split: group}) if split else rows
            px, means, lows, highs = [], [], [], []
            for value in xs:
                stats = mean_ci([r.get(measure) for r in select(chosen, {x: value})])
                if stats[3] == 0:
                    continue
                mean, low, high, n = stats
                px.append(positions[value] + (g - (len(groups) - 1) / 2) * offset_step)
                means.append(mean)
                lows.append(mean - low)
                highs.append(high - mean)
                table.append(
                    {
                        "measure": measure,
                        "x": x,
                        "x_value": value,
                        "split": split,
                        "split_value": group,
                        "n": n,
                        "mean": mean,
                        "low": low,
                        "high": high,
                    }
                )
            label = f"{split}={group}" if split else None
            ax.errorbar(px, means, yerr=[lows, highs], marker="o", capsize=3, label=label)
        ax.set_title(measure)
        ax.set_xlabel(x)
        if not numeric:
            ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=45, ha="right")
        if split and index == 0:
            ax.legend(fontsize="small")
    for index in range(len(measures), lines * columns):
        axes[index // columns][index % columns].set_visible(False)
    title = f"mean ± 95% CI vs {x}" + (f", by {split}" if split else "")
    if where:
        title += " (" + ", ".join(f"{k}={v}" for k, v in where.items()) + ")"
    figure.suptitle(title)
    return figure, table


def outcome_plot(rows: Sequence[ProportionRow], by: str, classes: Sequence[str]) -> Any:
    """Share of each outcome class per group with 95% Wilson intervals."""
    groups = list(dict.fromkeys(r.group for r in rows))
    figure = _new_figure(max(5.0, 0.6 * len(groups) * len(classes) / 2 + 3), 3.6)
    ax = figure.subplots()
    width = 0.8 / max(1, len(classes))
    for c, outcome in enumerate(classes):
        chosen = [r for r in rows if r.outcome == outcome]
        xs = [groups.index(r.group) + (c - (len(classes) - 1) / 2) * width for r in chosen]
        ps = [0.0 if r.total == 0 else r.proportion for r in chosen]
        errors = [
            [p - r.low for p, r in zip(ps, chosen, strict=True)],
            [r.high - p for p, r in zip(ps, chosen, strict=True)],
        ]
        ax.bar(xs, ps, width=width, label=str(outcome), yerr=errors, capsize=2)
    ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images")
    ax.set_xlabel(by)
    ax.legend(fontsize="small")
    figure.suptitle(f"outcomes by {by} (95% Wilson intervals)")
    return figure

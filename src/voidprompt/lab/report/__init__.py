"""``voidprompt study report``: one self-contained HTML file plus PNG/SVG figures and CSV/Parquet.

The HTML embeds every figure as a base64 PNG (it opens offline, alone) and links the SVG and CSV
files written beside it. A study's ``[report]`` table chooses what is shown; every key is optional::

    [report]
    base = 64                                   # area = width*height/base^2 (default 512)
    grid = { x = "W", y = "size" }              # default: the first two non-seed axes
    outcomes_by = ["size", { by = "W", where = { size = "64x64" } }]   # default: every non-seed axis
    [[report.plots]]                            # default: each non-seed axis, split by the next
    x = "area"
    split = "W"
    where = { cfg_scale = 7.0 }
    measures = ["salient_regions", "luminance"]
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt import __version__
from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog, atomic_write
from voidprompt.lab.labels import label_scheme
from voidprompt.lab.report.data import ReportData, collect, outcome_counts
from voidprompt.lab.report.figures import image_grid, measure_plot, outcome_plot, save_figure
from voidprompt.lab.run import default_catalog_path, resolve_model
from voidprompt.lab.stats import ProportionRow, proportion_table
from voidprompt.lab.study import Study

__all__ = ["PlotSpec", "ReportOptions", "ReportResult", "build_report", "report_options"]

MAX_GRID_PAGES = 24


@dataclass(frozen=True)
class PlotSpec:
    x: str
    split: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    measures: tuple[str, ...] = ()  # empty: every measure


@dataclass(frozen=True)
class ReportOptions:
    base: int = 512
    grid: tuple[str, str] | None = None
    outcomes_by: tuple[tuple[str, Mapping[str, Any]], ...] | None = None  # (axis, where)
    plots: tuple[PlotSpec, ...] | None = None


@dataclass
class ReportResult:
    html: Path
    figures: list[Path]
    csvs: list[Path]
    parquet: Path | None
    outcome_tables: dict[str, list[ProportionRow]]


def report_options(study: Study) -> ReportOptions:
    raw = dict(study.report_options)
    where = f"{study.path}: [report]"
    allowed = ("base", "grid", "outcomes_by", "plots")
    for key in raw:
        if key not in allowed:
            raise StudyError(f"{where} {key}: unknown key; allowed: {', '.join(allowed)}")
    base = raw.get("base", 512)
    if not isinstance(base, int) or isinstance(base, bool) or base <= 0:
        raise StudyError(f"{where} base: {base!r}; write the side of the unit area in pixels, e.g. 64")
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or set(grid) != {"x", "y"}:
            raise StudyError(f'{where} grid: write grid = {{ x = "W", y = "size" }}')
        grid = (str(grid["x"]), str(grid["y"]))
    outcomes_by = raw.get("outcomes_by")
    if outcomes_by is not None:
        entries: list[tuple[str, dict[str, Any]]] = []
        for entry in outcomes_by if isinstance(outcomes_by, list) else [None]:
            if isinstance(entry, str):
                entries.append((entry, {}))
            elif isinstance(entry, dict) and "by" in entry and not set(entry) - {"by", "where"}:
                entries.append((str(entry["by"]), dict(entry.get("where", {}))))
            else:
                raise StudyError(
                    f'{where} outcomes_by: write axis names or tables, e.g. ["size", '
                    '{ by = "W", where = { size = "64x64" } }]'
                )
        outcomes_by = tuple(entries)
    plots = raw.get("plots")
    if plots is not None:
        specs = []
        for i, plot in enumerate(plots if isinstance(plots, list) else [None]):
            if (
                not isinstance(plot, dict)
                or "x" not in plot
                or set(plot) - {"x", "split", "where", "measures"}
            ):
                raise StudyError(
                    f'{where} plots #{i + 1}: write {{ x = "W", split = "size", where = {{...}}, '
                    'measures = ["luminance"] }} (only x is required)'
                )
            specs.append(
                PlotSpec(
                    plot["x"], plot.get("split"), dict(plot.get("where", {})), tuple(plot.get("measures", ()))
                )
            )
        plots = tuple(specs)
    return ReportOptions(base, grid, outcomes_by, plots)


def _b64_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "x"


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    def write(temp: Path) -> None:
        with temp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_write(path, write)
    return path


def _model_card(study: Study) -> str | None:
    try:
        checkpoint, _ = resolve_model(study.model, study.path.parent)
    except StudyError as error:
        return f"(model file not available: {error})"
    for candidate in (
        checkpoint.with_suffix(".md"),
        checkpoint.parent / "MODEL_CARD.md",
        checkpoint.parent / "README.md",
    ):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def build_report(
    study: Study, *, catalog_path: str | Path | None = None, out_dir: str | Path | None = None
) -> ReportResult:
    """Write the report of ``study``'s catalog into ``out_dir`` (default: ``report/`` beside it)."""
    options = report_options(study)
    scheme = label_scheme(study)
    path = Path(catalog_path) if catalog_path is not None else default_catalog_path(study)
    out = Path(out_dir) if out_dir is not None else path.parent / "report"
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    with Catalog.open(path, readonly=True) as catalog:
        data = collect(catalog, study, options.base)
        summary = catalog.summary()
    if not data.rows:
        raise StudyError(f"{path}: the catalog has no images yet; run the study first (voidprompt study run)")
    factors = data.factors
    figures: list[Path] = []
    csvs: list[Path] = []
    sections: list[str] = []

    # --- image grids
    grid = options.grid
    if grid is None:
        picks = [*factors, "seed"] if len(factors) < 2 else factors
        grid = (picks[0], picks[1]) if len(picks) >= 2 else (picks[0], "seed")
    for column in grid:
        data.check_column(column, "grid")
    others = [f for f in factors if f not in grid]
    pages = list(itertools.product(*[data.values(f) for f in others])) or [()]
    grid_html = []
    for number, combo in enumerate(pages[:MAX_GRID_PAGES], start=1):
        fixed = dict(zip(others, combo, strict=True))
        if "seed" not in grid and "seed" in data.axes:
            fixed["seed"] = data.values("seed")[0]
        rows_here = [r for r in data.rows if all(r.get(k) == v for k, v in fixed.items())]
        if not rows_here:
            continue
        title = ", ".join(f"{k}={v}" for k, v in fixed.items()) or "all images"
        page = image_grid(data, path.parent, grid[0], grid[1], fixed, title)
        png = figures_dir / f"grid-{number:02d}.png"
        page.save(png, format="PNG")  # a figure, not data: a crash leaves a file the rerun rewrites
        figures.append(png)
        grid_html.append(
            f"<figure><img alt='grid {number}' src='{_b64_png(png)}'>"
            f"<figcaption>{html.escape(title)}</figcaption></figure>"
        )
    skipped = max(0, len(pages) - MAX_GRID_PAGES)
    sections.append(
        f"<h2>Image grids: {html.escape(grid[0])} × {html.escape(grid[1])}</h2>"
        + "".join(grid_html)
        + (f"<p>{skipped} more pages not shown (set [report] grid to other axes).</p>" if skipped else "")
    )

    # --- measure plots
    plots = options.plots
    if plots is None:
        xs = [f for f in factors if len(data.values(f)) > 1]
        if len({(r["width"], r["height"]) for r in data.rows}) > 1 and "area" not in xs:
            xs.append("area")
        plots = tuple(
            PlotSpec(x, next((f for f in factors if f != x and len(data.values(f)) > 1), None)) for x in xs
        )
    plot_rows: list[dict[str, Any]] = []
    plot_html = []
    for number, spec in enumerate(plots, start=1):
        data.check_column(spec.x, f"plots #{number} x")
        if spec.split:
            data.check_column(spec.split, f"plots #{number} split")
        for key in spec.where:
            data.check_column(key, f"plots #{number} where")
        measures = list(spec.measures) or data.measures
        for m in measures:
            data.check_column(m, f"plots #{number} measures")
        figure, numbers = measure_plot(data, measures, spec.x, spec.split, spec.where)
        for row in numbers:
            row["plot"] = number
        plot_rows += numbers
        png, svg = save_figure(figure, figures_dir / f"plot-{number:02d}-{_slug(spec.x)}")
        figures += [png, svg]
        plot_html.append(
            f"<figure><img alt='plot {number}' src='{_b64_png(png)}'><figcaption>"
            f"<a href='figures/{svg.name}'>SVG</a></figcaption></figure>"
        )
    header = ["plot", "measure", "x", "x_value", "split", "split_value", "n", "mean", "low", "high"]
    csvs.append(_write_csv(out / "measures-by-axis.csv", header, [[r[h] for h in header] for r in plot_rows]))
    sections.append(
        "<h2>Measures (mean ± 95% CI)</h2>"
        + "".join(plot_html)
        + "<p><a href='measures-by-axis.csv'>numbers (CSV)</a></p>"
    )

    # --- outcome tables
    tables: dict[str, list[ProportionRow]] = {}
    labelled = sum(1 for r in data.rows if r["label"] in scheme.classes)
    outcome_html = [
        f"<h2>Outcomes</h2><p>{labelled} of {len(data.rows)} images labelled "
        f"(a person's label wins over a plugin's); classes: "
        f"{html.escape(', '.join(scheme.classes))}.</p>"
    ]
    by_axes = options.outcomes_by
    if by_axes is None:
        by_axes = tuple((f, {}) for f in factors)
    if labelled:
        for by, condition in by_axes:
            data.check_column(by, "outcomes_by")
            for key in condition:
                data.check_column(key, "outcomes_by where")
            counts = outcome_counts(data, by, scheme.classes, condition)
            rows = proportion_table(counts, scheme.classes)
            tables[by] = rows
            if condition:
                outcome_html.append(
                    "<p>" + html.escape(", ".join(f"{k}={v}" for k, v in condition.items())) + "</p>"
                )
            name = f"outcomes-by-{_slug(by)}.csv"
            header = ["group", "outcome", "count", "total", "proportion", "low", "high"]
            csvs.append(
                _write_csv(
                    out / name,
                    header,
                    [[r.group, r.outcome, r.count, r.total, r.proportion, r.low, r.high] for r in rows],
                )
            )
            png, svg = save_figure(
                outcome_plot(rows, by, scheme.classes), figures_dir / f"outcomes-{_slug(by)}"
            )
            figures += [png, svg]
            outcome_html.append(_outcome_table(rows, by, scheme.classes))
            outcome_html.append(
                f"<figure><img alt='outcomes by {html.escape(by)}' src='{_b64_png(png)}'>"
                f"<figcaption><a href='figures/{svg.name}'>SVG</a> · "
                f"<a href='{name}'>CSV</a></figcaption></figure>"
            )
    sections.append("".join(outcome_html))

    # --- exports
    columns = list(dict.fromkeys(k for r in data.rows for k in r))
    csvs.append(_write_csv(out / "images.csv", columns, [[r.get(c) for c in columns] for r in data.rows]))
    parquet = _write_parquet(out / "images.parquet", data, columns)

    card = _model_card(study)
    about = (
        f"<h2>Reproduce</h2><p>voidprompt {html.escape(__version__)} · catalog "
        f"{html.escape(str(path))} · {html.escape(summary.format()).replace(chr(10), '<br>')}</p>"
        f"<h3>Study file</h3><pre>{html.escape(study.toml_text)}</pre>"
        + (f"<h3>Model card</h3><pre>{html.escape(card)}</pre>" if card else "<p>No model card found.</p>")
    )
    exports = [*csvs, *([parquet] if parquet else [])]
    text = _PAGE.format(
        title=html.escape(study.name),
        description=html.escape(study.description),
        body="".join(sections) + about,
        downloads=" · ".join(f"<a href='{p.name}'>{p.name}</a>" for p in exports),
    )
    report_html = out / "report.html"
    atomic_write(report_html, lambda temp: _write_text(temp, text))
    return ReportResult(report_html, figures, csvs, parquet, tables)


def _outcome_table(rows: Sequence[ProportionRow], by: str, classes: Sequence[str]) -> str:
    groups = list(dict.fromkeys(r.group for r in rows))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in classes)
    body = []
    for group in groups:
        cells = []
        total = 0
        for outcome in classes:
            r = next(x for x in rows if x.group == group and x.outcome == outcome)
            total = r.total
            share = "–" if r.total == 0 else f"{100 * r.proportion:.0f}%"
            interval = f"[{100 * r.low:.0f}–{100 * r.high:.0f}%]"
            cells.append(
                f"<td data-count='{r.count}' data-low='{r.low:.6f}' data-high='{r.high:.6f}'>"
                f"{r.count} ({share})<br><small>{interval}</small></td>"
            )
        body.append(f"<tr><th>{html.escape(str(group))}</th><td>{total}</td>{''.join(cells)}</tr>")
    name = html.escape(by)
    return (
        f"<table class='outcomes' data-by='{name}'><caption>Outcomes by {name}: "
        f"count (share) [95% Wilson interval]</caption><tr><th>{name}</th><th>n</th>{head}</tr>"
        + "".join(body)
        + "</table>"
    )


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def _write_parquet(path: Path, data: ReportData, columns: Sequence[str]) -> Path | None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return None  # optional: CSV carries the same table

    def cell(value: Any) -> Any:
        # Axis columns can mix types across [[points]]; JSON keeps such a column one type.
        return value if isinstance(value, int | float | str | type(None)) else json.dumps(value)

    table = {}
    for c in columns:
        values = [cell(r.get(c)) for r in data.rows]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float}:
            values = [None if v is None else str(v) for v in values]
        table[c] = values
    atomic_write(path, lambda temp: pq.write_table(pa.table(table), temp))
    return path


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - voidprompt study report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 100%; image-rendering: pixelated; }}
table.outcomes {{ border-collapse: collapse; margin: 1em 0; }}
table.outcomes td, table.outcomes th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1><p>{description}</p><p>Downloads: {downloads}</p>
{body}
</body></html>
"""

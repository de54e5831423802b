"""``voidprompt study report``: one self-contained HTML file plus PNG/SVG figures and CSV/Parquet.

The HTML embeds every figure as a base64 PNG (it opens offline, alone) and links the SVG and CSV
files written beside it. A study's ``[report]`` table chooses what is shown (every key is optional;
``docs/study-format.md`` has them all, :mod:`voidprompt.lab.schema` reads them)::

    [report]
    base = 64                                   # area = width*height/base^2 (default 512)
    grid = { x = "W", y = "size" }              # default: the first two non-seed axes
    # or several grids, each on a selection, with at most `rows` values of y per page:
    # grid = [{ x = "size", y = "seed", where = { W = 1.0 }, rows = 8 }, { x = "W", y = "seed" }]
    outcomes_by = ["size", { by = "W", where = { size = "64x64" } }]   # default: every non-seed axis
    [[report.plots]]                            # default: each non-seed axis, split by the next
    x = "area"
    split = "W"
    where = { cfg_scale = 7.0, size = ["64x64", "128x128"] }   # a list: any of these values
    measures = ["salient_regions", "luminance"]

Under each plot a table gives every mean with its 95% interval, and, for a numeric x with at
least three values, the least-squares slope over the images with its 95% t interval; the
"Trends" table at the top of the report collects those slopes and says which way each measure
goes (up or down when the interval excludes 0).

Images captured with ``[explain]`` add the "Explanations" section, one view per ``[report] explain``
entry (default: each axis with several values among them): a grid of tag heatmaps (rows: the tags
with the largest mean attention share, columns: the axis values), the tags' attention measures
(mass share, spread; a line per tag) and the guidance difference (a line per step window) against
the axis, plotted, tabled and trended like the measures above.
"""

from __future__ import annotations

import base64
import csv
import html
import itertools
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt import __version__
from voidprompt.errors import StudyError, VoidpromptError
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import Catalog, default_catalog_path
from voidprompt.lab.labels import HUMAN, label_scheme
from voidprompt.lab.plugins import Plugins, installed_plugins
from voidprompt.lab.report import explain as ex
from voidprompt.lab.report.data import ReportData, collect, outcome_counts, select
from voidprompt.lab.report.figures import image_grid, measure_plot, outcome_plot, save_figure
from voidprompt.lab.schema import ExplainView, GridSpec, PlotSpec, ReportOptions
from voidprompt.lab.stats import ProportionRow, linear_slope, proportion_table
from voidprompt.lab.study import Study

__all__ = [
    "GridSpec",
    "PlotSpec",
    "ReportOptions",
    "ReportResult",
    "build_report",
    "measure_trends",
]

MAX_GRID_PAGES = 24


@dataclass
class ReportResult:
    html: Path
    figures: list[Path]
    csvs: list[Path]
    parquet: Path | None
    outcome_tables: dict[str, list[ProportionRow]]
    trends: list[dict[str, Any]] = field(default_factory=list)


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


def _model_card(study: Study, plugins: Plugins) -> str | None:
    """The summary of the model's card (see :func:`card_summary`) and where the whole card is."""
    try:
        checkpoint = plugins.resolve_model(study.model, study.path.parent).checkpoint
    except VoidpromptError as error:
        return f"(model file not available: {error})"
    for candidate in (
        checkpoint.with_suffix(".md"),
        checkpoint.parent / "MODEL_CARD.md",
        checkpoint.parent / "README.md",
    ):
        if candidate.is_file():
            summary = card_summary(candidate.read_text(encoding="utf-8", errors="replace"))
            return f"{summary}\n\n(the whole card: {candidate})\n"
    return None


def card_summary(text: str) -> str:
    """A model card's head: its title, summary and figures, up to the first ``## `` section.

    A report records which model made its pictures; the card's full sections (training, history,
    limits) stay in the card."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    return "\n".join(lines[:end]).rstrip()


def build_report(
    study: Study,
    *,
    catalog_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    plugins: Plugins | None = None,
) -> ReportResult:
    """Write the report of ``study``'s catalog into ``out_dir`` (default: ``report/`` beside it).

    ``plugins`` (the study's labeler and named model) default to the installed ones.
    """
    plugins = installed_plugins() if plugins is None else plugins
    options = study.report
    scheme = label_scheme(study, plugins)
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
    grids = options.grids
    if grids is None:
        picks = [*factors, "seed"] if len(factors) < 2 else factors
        grids = (GridSpec(*((picks[0], picks[1]) if len(picks) >= 2 else (picks[0], "seed"))),)
    grid_html = []
    pages_total = 0
    number = 0
    for g, gspec in enumerate(grids, start=1):
        data.check_column(gspec.x, f"grid #{g} x")
        data.check_column(gspec.y, f"grid #{g} y")
        for key in gspec.where:
            data.check_column(key, f"grid #{g} where")
        chosen = select(data.rows, gspec.where)
        others = [f for f in factors if f not in (gspec.x, gspec.y) and f not in gspec.where]
        combos = list(itertools.product(*[data.values(f, chosen) for f in others])) or [()]
        ys = data.values(gspec.y, chosen)
        per_page = gspec.rows or max(1, len(ys))
        for combo in combos:
            fixed: dict[str, Any] = dict(zip(others, combo, strict=True))
            if "seed" not in (gspec.x, gspec.y) and "seed" in data.axes and "seed" not in gspec.where:
                fixed["seed"] = data.values("seed", chosen)[0]
            rows_here = select(chosen, fixed)
            if not rows_here:
                continue
            y_here = data.values(gspec.y, rows_here)
            for page_index, first in enumerate(range(0, max(1, len(y_here)), per_page)):
                pages_total += 1
                if number >= MAX_GRID_PAGES or (gspec.pages is not None and page_index >= gspec.pages):
                    continue
                number += 1
                y_page = y_here[first : first + per_page]
                page_rows = select(rows_here, {gspec.y: y_page})
                labels = {**gspec.where, **fixed}
                title = ", ".join(f"{k}={v}" for k, v in labels.items()) or "all images"
                if len(y_here) > len(y_page):
                    title += f" ({gspec.y} {first + 1}-{first + len(y_page)} of {len(y_here)})"
                page = image_grid(data, path.parent, gspec.x, gspec.y, {}, title, rows=page_rows)
                png = figures_dir / f"grid-{number:02d}.png"
                page.save(png, format="PNG")  # a figure, not data: a crash leaves a file the rerun rewrites
                figures.append(png)
                grid_html.append(
                    f"<figure><img alt='grid {number}: {html.escape(gspec.x)} x {html.escape(gspec.y)}' "
                    f"src='{_b64_png(png)}'><figcaption>{html.escape(gspec.x)} × {html.escape(gspec.y)}: "
                    f"{html.escape(title)}</figcaption></figure>"
                )
    skipped = max(0, pages_total - number)
    sections.append(
        "<h2>Image grids</h2>"
        + "".join(grid_html)
        + (f"<p>{skipped} more pages not shown (choose [report] grid axes or rows).</p>" if skipped else "")
    )

    # --- measure plots, their tables and trends
    plots = options.plots
    if plots is None:
        xs = [f for f in factors if len(data.values(f)) > 1]
        if len({(r["width"], r["height"]) for r in data.rows}) > 1 and "area" not in xs:
            xs.append("area")
        plots = tuple(
            PlotSpec(x, next((f for f in factors if f != x and len(data.values(f)) > 1), None)) for x in xs
        )
    plot_rows: list[dict[str, Any]] = []
    trends: list[dict[str, Any]] = []
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
        plot_trends = measure_trends(data, measures, spec.x, spec.split, spec.where)
        for row in plot_trends:
            row["plot"] = number
        trends += plot_trends
        png, svg = save_figure(figure, figures_dir / f"plot-{number:02d}-{_slug(spec.x)}")
        figures += [png, svg]
        plot_html.append(
            f"<section class='plot' id='plot-{number}' data-x='{html.escape(spec.x)}'>"
            f"<figure><img alt='plot {number}: {html.escape(', '.join(measures))} vs {html.escape(spec.x)}' "
            f"src='{_b64_png(png)}'><figcaption><a href='figures/{svg.name}'>SVG</a></figcaption></figure>"
            + _measure_table(numbers, plot_trends, spec, measures)
            + "</section>"
        )
    header = ["plot", "measure", "x", "x_value", "split", "split_value", "n", "mean", "low", "high"]
    csvs.append(_write_csv(out / "measures-by-axis.csv", header, [[r[h] for h in header] for r in plot_rows]))
    sections.append(
        "<h2>Measures (mean ± 95% CI)</h2>"
        + "".join(plot_html)
        + "<p><a href='measures-by-axis.csv'>numbers (CSV)</a> · <a href='trends.csv'>trends (CSV)</a></p>"
    )

    # --- explanations (captured attention maps and guidance)
    explain_html, explain_figures, explain_rows, explain_trends = _explain_section(
        data, options.explain, path.parent, figures_dir
    )
    figures += explain_figures
    trends += explain_trends
    if explain_html:
        csvs.append(
            _write_csv(out / "explain-by-axis.csv", ["view", *header[1:]],
                       [[r["plot"], *(r[h] for h in header[1:])] for r in explain_rows])
        )  # fmt: skip
        sections.append(explain_html + "<p><a href='explain-by-axis.csv'>numbers (CSV)</a></p>")
    trend_header = ["plot", "measure", "x", "split", "split_value", "where", "n", "slope", "low", "high",
                    "direction"]  # fmt: skip
    csvs.append(
        _write_csv(
            out / "trends.csv",
            trend_header,
            [[r[h] if h != "where" else json.dumps(r[h], default=str) for h in trend_header] for r in trends],
        )
    )

    # --- outcome tables
    tables: dict[str, list[ProportionRow]] = {}
    labelled = sum(1 for r in data.rows if r["label"] in scheme.classes)
    outcome_html = [
        f"<h2>Outcomes</h2><p class='labelled'>{labelled} of {len(data.rows)} images labelled"
        f"{_label_sources(data.rows, scheme.classes)} (a person's label wins over a labeler's); classes: "
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

    card = _model_card(study, plugins)
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
        # The pictures first: the grids are what a reader looks at before the numbers.
        body=sections[0] + _trend_table(trends) + "".join(sections[1:]) + about,
        downloads=" · ".join(f"<a href='{p.name}'>{p.name}</a>" for p in exports),
    )
    report_html = out / "report.html"
    atomic_write(report_html, lambda temp: _write_text(temp, text))
    # Figures of an earlier report with other options would be mistaken for this one's.
    for stale in {*figures_dir.glob("*.png"), *figures_dir.glob("*.svg")} - set(figures):
        stale.unlink()
    return ReportResult(report_html, figures, csvs, parquet, tables, trends)


def _explain_section(
    data: ReportData, views: Sequence[ExplainView] | None, folder: Path, figures_dir: Path
) -> tuple[str, list[Path], list[dict[str, Any]], list[dict[str, Any]]]:
    """The report's "Explanations" section: (html, figures, plotted numbers, trends); empty when
    no image has an explanation."""
    captured = ex.captured_rows(data, {})
    if not captured:
        return "", [], [], []
    if views is None:
        views = tuple(ExplainView(f) for f in data.factors if len(data.values(f, captured)) > 1)[:3]
    windows = list(dict.fromkeys(t["window"] for t in data.tag_rows))
    parts = [
        "<h2>Explanations</h2><p>From the images captured with [explain]: per tag, the share of the "
        "attention its prompt's tags get (<b>mass_share</b>, start and padding tokens left out) and how "
        "evenly it spreads over the picture (<b>spread</b>, normalised entropy, 1 = even); per step "
        "window, the mean |cond - uncond| of the predicted clean latent (<b>guidance_difference</b>). "
        "Heatmaps: the mean map over the seeds at each value, over the first of their pictures, one "
        "colour scale per row.</p>"
    ]
    figures: list[Path] = []
    numbers: list[dict[str, Any]] = []
    trends: list[dict[str, Any]] = []
    for number, view in enumerate(views, start=1):
        data.check_column(view.x, f"explain #{number} x")
        for key in view.where:
            data.check_column(key, f"explain #{number} where")
        if view.window not in windows:
            raise StudyError(
                f"[report] explain #{number} window = {view.window!r}: no captured image has that step "
                f"window; choose one of {', '.join(windows)}"
            )
        images = ex.captured_rows(data, view.where)
        tag_rows = ex.tag_rows(data, images, view)
        tags = ex.top_tags(tag_rows, view.tags)
        condition = ", ".join(f"{k}={v}" for k, v in view.where.items()) or "all captured images"
        title = f"{view.x}, window {view.window}" + (f", {view.branch} prompt" if view.branch else "")
        parts.append(f"<h3>{html.escape(title)} ({html.escape(condition)}, {len(images)} images)</h3>")
        if not tags:
            parts.append("<p>No captured image here has tags in this window.</p>")
            continue
        slug = f"explain-{number:02d}-{_slug(view.x)}"
        grid = ex.heatmap_grid(data, folder, images, view, tags, f"{title}: {condition}")
        png = figures_dir / f"{slug}-heatmaps.png"
        grid.save(png, format="PNG")
        figures.append(png)
        parts.append(
            f"<figure><img alt='tag heatmaps against {html.escape(view.x)}' src='{_b64_png(png)}'>"
            f"<figcaption>tag × {html.escape(view.x)}: mean attention map over the seeds</figcaption>"
            "</figure>"
        )
        for stem, source, split in (
            ("tags", ex.tag_table(data, images, tag_rows, tags), "tag"),
            ("guidance", ex.guidance_table(data, images, windows), "window"),
        ):
            if not source.rows:
                continue
            measures = source.measures
            figure, rows = measure_plot(source, measures, view.x, split, {})
            view_trends = measure_trends(source, measures, view.x, split, {})
            for row in (*rows, *view_trends):
                row["plot"] = f"explain {number}"
            for row in view_trends:
                row["where"] = dict(view.where)
            numbers += rows
            trends += view_trends
            png, svg = save_figure(figure, figures_dir / f"{slug}-{stem}")
            figures += [png, svg]
            spec = PlotSpec(view.x, split, view.where, tuple(measures))
            parts.append(
                f"<section class='plot explain' data-x='{html.escape(view.x)}' data-kind='{stem}'>"
                f"<figure><img alt='{stem} measures vs {html.escape(view.x)}' src='{_b64_png(png)}'>"
                f"<figcaption><a href='figures/{svg.name}'>SVG</a></figcaption></figure>"
                + _measure_table(rows, view_trends, spec, measures)
                + "</section>"
            )
    return "".join(parts), figures, numbers, trends


def measure_trends(
    data: ReportData,
    measures: Sequence[str],
    x: str,
    split: str | None,
    where: Mapping[str, Any],
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Least-squares slope of each measure on a numeric ``x`` over the selected images.

    One row per measure (and value of ``split``) with at least three distinct x values: the slope,
    its t interval, and ``direction`` "up" / "down" when the interval excludes 0, else "flat".
    """
    rows = select(data.rows, where)
    groups = data.values(split, rows) if split else [None]
    found = []
    for measure in measures:
        for group in groups:
            chosen = select(rows, {split: group}) if split else rows
            pairs = [
                (float(r[x]), float(r[measure]))
                for r in chosen
                if _is_number(r.get(x)) and _is_number(r.get(measure)) and not math.isnan(float(r[measure]))
            ]
            if len({p[0] for p in pairs}) < 3:
                continue
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            try:
                fit = linear_slope(xs, ys, confidence)
            except StudyError:  # pragma: no cover - guarded by the distinct-x check above
                continue
            low, high = fit.low, fit.high
            if math.isnan(low) or math.isnan(high):  # every y equal: no spread, no interval
                low = high = fit.slope
            direction = "up" if low > 0 else "down" if high < 0 else "flat"
            found.append(
                {"measure": measure, "x": x, "split": split, "split_value": group, "where": dict(where),
                 "n": fit.n, "slope": fit.slope, "low": low, "high": high, "direction": direction}
            )  # fmt: skip
    return found


def _label_sources(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """Who the counted labels came from: ": 3 by a person, 9 by the labeler detector"."""
    sources = Counter(r["label_source"] for r in rows if r["label"] in classes)
    if not sources:
        return ""
    parts = [f"{sources.pop(HUMAN)} by a person"] if HUMAN in sources else []
    parts += [f"{n} by the labeler {html.escape(str(source))}" for source, n in sorted(sources.items())]
    return ": " + ", ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _measure_table(
    numbers: Sequence[Mapping[str, Any]], trends: Sequence[Mapping[str, Any]], spec: PlotSpec,
    measures: Sequence[str],
) -> str:  # fmt: skip
    """Means with 95% intervals per x value (columns) for each measure and split value (rows)."""
    xs = list(dict.fromkeys(r["x_value"] for r in numbers))
    head = "".join(f"<th>{html.escape(spec.x)}={html.escape(_fmt(v))}</th>" for v in xs)
    has_trend = bool(trends)
    body = []
    for measure in measures:
        splits = list(dict.fromkeys(r["split_value"] for r in numbers if r["measure"] == measure))
        for group in splits:
            cells = []
            for value in xs:
                r = next(
                    (r for r in numbers
                     if r["measure"] == measure and r["split_value"] == group and r["x_value"] == value),
                    None,
                )  # fmt: skip
                if r is None:
                    cells.append("<td>–</td>")
                    continue
                cells.append(
                    f"<td data-n='{r['n']}' data-mean='{r['mean']:.6g}' data-low='{r['low']:.6g}' "
                    f"data-high='{r['high']:.6g}'>{r['mean']:.3g}<br><small>[{r['low']:.3g}, "
                    f"{r['high']:.3g}] n={r['n']}</small></td>"
                )
            trend = next((t for t in trends if t["measure"] == measure and t["split_value"] == group), None)
            trend_cell = ""
            if has_trend:
                trend_cell = "<td>–</td>" if trend is None else _trend_cell(trend)
            name = html.escape(measure) + (f" ({html.escape(str(spec.split))}={html.escape(_fmt(group))})"
                                           if spec.split else "")  # fmt: skip
            body.append(
                f"<tr data-measure='{html.escape(measure)}'><th>{name}</th>{''.join(cells)}{trend_cell}</tr>"
            )
    trend_head = "<th>slope [95% CI]</th>" if has_trend else ""
    return (
        f"<table class='measures' data-x='{html.escape(spec.x)}'><caption>mean [95% t interval] "
        f"per {html.escape(spec.x)}</caption><tr><th>measure</th>{head}{trend_head}</tr>"
        + "".join(body)
        + "</table>"
    )


def _trend_cell(trend: Mapping[str, Any]) -> str:
    return (
        f"<td class='trend {trend['direction']}' data-slope='{trend['slope']:.6g}' "
        f"data-low='{trend['low']:.6g}' data-high='{trend['high']:.6g}'>{trend['slope']:.3g}"
        f"<br><small>[{trend['low']:.3g}, {trend['high']:.3g}] {trend['direction']}</small></td>"
    )


def _trend_table(trends: Sequence[Mapping[str, Any]]) -> str:
    if not trends:
        return ""
    rows = []
    for t in trends:
        where = ", ".join(f"{k}={v}" for k, v in t["where"].items())
        split = "" if t["split"] is None else f"{t['split']}={_fmt(t['split_value'])}"
        rows.append(
            f"<tr data-x='{html.escape(t['x'])}' data-measure='{html.escape(t['measure'])}'>"
            f"<th>{html.escape(t['measure'])} vs {html.escape(t['x'])}</th>"
            f"<td>{html.escape(', '.join(p for p in (where, split) if p) or 'all images')}</td>"
            f"<td>{t['n']}</td>{_trend_cell(t)}</tr>"
        )
    return (
        "<h2>Trends</h2><p>Least-squares slope of each plotted measure on its axis over the images "
        "(per unit of the axis), with a 95% t interval: <b>up</b> / <b>down</b> when the interval "
        "excludes 0, <b>flat</b> otherwise. Plots and per-value tables follow.</p>"
        "<table class='trends'><tr><th>measure vs axis</th><th>images</th><th>n</th>"
        "<th>slope [95% CI]</th></tr>" + "".join(rows) + "</table>"
    )


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
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td.up {{ background: #e6f4e6; }} td.down {{ background: #f8e6e6; }}
section.plot {{ margin-bottom: 2em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head>
<body><h1>{title}</h1><p>{description}</p><p>Downloads: {downloads}</p>
{body}
</body></html>
"""

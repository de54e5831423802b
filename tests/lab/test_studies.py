"""The shipped study files: the demo study's design, and its report checked against the catalog.

The report's numbers are recomputed here from the catalog with independent tools (scipy's t
interval, ``linregress`` and Wilson interval; the detector called directly on the saved PNGs), and
its figures are checked to exist as PNG (embedded) and SVG (linked) files.
"""

import html
import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from voidprompt import __version__
from voidprompt.demo.labeler import WORLD_CLASSES
from voidprompt.demo.study import DEMO_STUDY
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.labels import label_scheme
from voidprompt.lab.report import ReportResult, build_report
from voidprompt.lab.run import run_study
from voidprompt.lab.sizes import aspect512
from voidprompt.lab.study import Study, load_study, parse_study

STUDIES = Path(__file__).resolve().parents[2] / "studies"
NOVELAI = [
    "lowres", "bad anatomy", "bad hands", "text", "error", "missing fingers", "extra digit", "fewer digits",
    "cropped", "worst quality", "low quality", "normal quality", "jpeg artifacts", "signature", "watermark",
    "username", "blurry", "artist name",
]  # fmt: skip
AREAS = (0.5, 1, 1.5, 2, 3, 4)
ASPECTS = ((1, 4), (1, 2), (2, 1), (4, 1))
W_VALUES = (0.8, 0.9, 1.0, 1.1, 1.3, 1.6, 2.0)
CFG_VALUES = (2.0, 4.0, 7.0, 10.0, 14.0, 20.0)


def test_pure_negative_design() -> None:
    study = load_study(DEMO_STUDY)
    jobs = study.expand()
    seeds = {j.request.seed for j in jobs}
    assert len(seeds) == 64
    square = {aspect512(1, 1, a, base=128, unit=8) for a in AREAS}
    oblong = {aspect512(w, h, 1, base=128, unit=8) for w, h in ASPECTS}
    # The study's ranges: 0.5x .. 4x the trained 128x128 area (the miniature model's native size),
    # aspect 1:4 .. 4:1.
    assert min(w * h for w, h in square) < 0.5 * 128 * 128 and max(w * h for w, h in square) == 4 * 128 * 128
    assert (64, 256) in oblong and (256, 64) in oblong
    centre = (128, 128, 1.0, 7.0)
    design = (
        {(w, h, 1.0, 7.0) for w, h in square | oblong}
        | {(128, 128, w, 7.0) for w in W_VALUES}
        | {(128, 128, 1.0, c) for c in CFG_VALUES}
    )
    assert centre in design
    found = Counter((j.request.width, j.request.height, j.axis_values["W"], j.request.cfg_scale)
                    for j in jobs)  # fmt: skip
    # Every design point with every seed, nothing else.
    assert set(found) == design and set(found.values()) == {64}
    assert len(jobs) == 64 * len(design) == 1344
    assert all(j.request.prompt == "" and j.request.clip_skip == 2 and j.request.steps == 20 for j in jobs)
    assert all(j.request.sampler_name == "Euler a" for j in jobs)
    negative = next(j.request.negative_prompt for j in jobs if j.axis_values["W"] == 1.6)
    assert negative == ", ".join(f"({tag}:1.6)" for tag in NOVELAI)
    assert label_scheme(study).classes == WORLD_CLASSES and label_scheme(study).labeler == "detector"
    options = study.report
    assert options.base == 128
    assert options.grids is not None and [(g.x, g.y) for g in options.grids] == [
        ("size", "seed"),
        ("W", "seed"),
        ("cfg_scale", "seed"),
    ]
    assert options.plots is not None and [p.x for p in options.plots] == ["area", "aspect", "W", "cfg_scale"]
    # No thread pin: torch's own default (every core) runs the study.
    assert (study.run.batch_size, study.run.threads) == (32, None)
    # Capture: the W trend's 7 points at 128x128, CFG 7, with the seed axis's first 32 seeds.
    first = list(next(a for a in study.axes if a.name == "seed").values[:32])
    captured = [j for j in jobs if j.job_id in study.captures(jobs)]
    assert len(captured) == 7 * 32
    assert Counter((j.request.width, j.request.height, j.axis_values["W"], j.request.cfg_scale)
                   for j in captured) == {(128, 128, w, 7.0): 32 for w in W_VALUES}  # fmt: skip
    assert {j.request.seed for j in captured} == set(first)
    assert options.explain is not None and [(v.x, v.branch) for v in options.explain] == [("W", "negative")]


# --------------------------------------------------------------- the demo study's report, on tiny


@pytest.fixture(scope="module")
def demo_on_tiny(
    tiny_f8_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Study, ReportResult]:
    """The demo study with 2 seeds and 2 steps on a tiny random checkpoint with a model card (its VAE
    downsamples by 8, so the study's 256x256 pictures are cheap)."""
    folder = tmp_path_factory.mktemp("demo")
    checkpoint = shutil.copy(tiny_f8_checkpoint, folder / "tiny.safetensors")
    (folder / "tiny.md").write_text("# Tiny card\nA random <model> for tests.\n")
    text = (DEMO_STUDY).read_text()
    text = text.replace("steps = 20", "steps = 2").replace('seed = "64 random"', 'seed = "2 random"')
    text = text.replace("seeds = 32", "seeds = 2")
    text += f'\n[model]\ncheckpoint = "{Path(checkpoint).name}"\n'
    study = parse_study(text, folder / "pure-negative.toml")
    report = run_study(study, study.run.override(progress=False, threads=1))
    assert report.generated == 2 * 21
    return study, build_report(study)


def _catalog_rows(study: Study) -> list[dict[str, Any]]:
    path = study.path.parent / "runs" / "pure-negative" / "catalog.sqlite"
    with Catalog.open(path, readonly=True) as catalog:
        measures = catalog.all_measures()
        labels = catalog.all_labels()
        rows = []
        for image in catalog.images():
            rows.append(
                {
                    **{k: v for k, v in image["axis_values"].items() if not k.endswith("_spec")},
                    "width": image["width"],
                    "height": image["height"],
                    "area": image["width"] * image["height"] / 128**2,
                    "aspect": image["width"] / image["height"],
                    "file": path.parent / image["path"],
                    "label": labels[image["id"]]["detector"][0],
                    **measures[image["id"]],
                }
            )
    return rows


def _sections(page: str) -> Iterator[tuple[str, str]]:
    pattern = r"<section class='plot' id='plot-\d+' data-x='([^']+)'>(.*?)</section>"
    for match in re.finditer(pattern, page, re.S):
        yield match.group(1), match.group(2)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=2e-5, abs_tol=1e-9)


def test_demo_report_figures(demo_on_tiny: tuple[Study, ReportResult]) -> None:
    study, result = demo_on_tiny
    page = result.html.read_text()
    figures = result.html.parent / "figures"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    svgs = sorted(p.name for p in figures.glob("*.svg"))
    # 3 grids (size, W, CFG x seed) and the negative tags' heatmaps against W; 4 measure plots,
    # the explain view's tag and guidance plots and 3 outcome figures, each as PNG and SVG.
    assert len([p for p in pngs if p.startswith("grid-")]) == 3
    assert "explain-01-w-heatmaps.png" in pngs
    stems = {p[:-4] for p in pngs if not p.startswith("grid-") and not p.endswith("-heatmaps.png")}
    assert {s for s in stems if s.startswith("explain-")} == {"explain-01-w-tags", "explain-01-w-guidance"}
    assert stems == {s[:-4] for s in svgs}
    assert {s for s in stems if s.startswith("plot-")} == {
        "plot-01-area", "plot-02-aspect", "plot-03-w", "plot-04-cfg-scale"
    }  # fmt: skip
    assert {s for s in stems if s.startswith("outcomes-")} == {
        "outcomes-size", "outcomes-w", "outcomes-cfg-scale"
    }  # fmt: skip
    # Self-contained: every PNG is embedded and decodes; every SVG link points at a file.
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(pngs)
    for svg in re.findall(r"href='figures/([^']+\.svg)'", page):
        assert (figures / svg).read_text().lstrip().startswith("<?xml")
    alts = re.findall(r"<img alt='(plot \d+: [^']+)'", page)
    assert "plot 1: detector_objects, salient_regions, edge_density, luminance vs area" in alts
    assert any(a.startswith("plot 3: salient_regions, edge_density") and a.endswith("vs W") for a in alts)
    assert any(a.startswith("plot 4: luminance, contrast, edge_density") and a.endswith("vs cfg_scale")
               for a in alts)  # fmt: skip
    for name in pngs:
        with Image.open(figures / name) as image:
            assert image.width > 100 and image.height > 100
    # Reproducible: the study file, the model card and the version are in the page.
    assert html.escape(study.toml_text) in page
    assert html.escape("# Tiny card\nA random <model> for tests.\n") in page
    assert f"voidprompt {html.escape(__version__)}" in page


def test_demo_report_measure_tables_match_the_catalog(demo_on_tiny: tuple[Study, ReportResult]) -> None:
    study, result = demo_on_tiny
    rows = _catalog_rows(study)
    page = result.html.read_text()
    selections = {
        "area": lambda r: r["W"] == 1.0 and r["cfg_scale"] == 7.0 and r["width"] == r["height"],
        "aspect": lambda r: r["W"] == 1.0 and r["cfg_scale"] == 7.0 and r["size"] in (
            "64x256", "88x176", "128x128", "176x88", "256x64"),
        "W": lambda r: r["size"] == "128x128" and r["cfg_scale"] == 7.0,
        "cfg_scale": lambda r: r["size"] == "128x128" and r["W"] == 1.0,
    }  # fmt: skip
    expected_x = {
        "area": sorted(w * h / 128**2 for w, h in (aspect512(1, 1, a, base=128, unit=8) for a in AREAS)),
        "aspect": sorted([0.25, 88 / 176, 1.0, 176 / 88, 4.0]),
        "W": list(W_VALUES),
        "cfg_scale": list(CFG_VALUES),
    }
    seen = set()
    for x, body in _sections(page):
        seen.add(x)
        chosen = [r for r in rows if selections[x](r)]
        xs = sorted({r[x] for r in chosen})
        assert xs == pytest.approx(expected_x[x])
        table_rows = re.findall(r"<tr data-measure='([^']+)'>(.*?)</tr>", body, re.S)
        assert table_rows
        for measure, cells in table_rows:
            values = re.findall(
                r"<td data-n='(\d+)' data-mean='([^']+)' data-low='([^']+)' data-high='([^']+)'>", cells
            )
            assert len(values) == len(xs)
            for xv, (n, mean, low, high) in zip(xs, values, strict=True):
                ys = np.array([r[measure] for r in chosen if math.isclose(r[x], xv, rel_tol=1e-5)])
                assert int(n) == len(ys) == 2
                m, sem = ys.mean(), stats.sem(ys)
                lo, hi = (m, m) if sem == 0 else stats.t.interval(0.95, len(ys) - 1, loc=m, scale=sem)
                assert _close(float(mean), m) and _close(float(low), lo) and _close(float(high), hi)
            # The slope over the images, with its 95% t interval (numeric x, >= 3 values).
            trend = re.search(r"<td class='trend (\w+)' data-slope='([^']+)' data-low='([^']+)' "
                              r"data-high='([^']+)'>", cells)  # fmt: skip
            assert trend is not None
            px = np.array([r[x] for r in chosen], dtype=float)
            py = np.array([r[measure] for r in chosen], dtype=float)
            fit = stats.linregress(px, py)
            # Every y equal: scipy gives no stderr; the report shows a zero-width interval.
            stderr = 0.0 if np.ptp(py) == 0 else fit.stderr
            half = stats.t.ppf(0.975, len(px) - 2) * stderr
            assert _close(float(trend.group(2)), fit.slope)
            assert _close(float(trend.group(3)), fit.slope - half)
            assert _close(float(trend.group(4)), fit.slope + half)
            direction = "up" if fit.slope - half > 0 else "down" if fit.slope + half < 0 else "flat"
            assert trend.group(1) == direction
    assert seen == {"area", "aspect", "W", "cfg_scale"}
    # The headline table collects the same slopes, and the explain view's: 6 negative tags' mass share
    # and spread, the guidance difference in 3 step windows (2 steps of Euler a are 2 denoiser calls:
    # all, early and middle; the late third is empty).
    assert page.count("<tr data-x=") == len(result.trends) == 4 + 3 + 5 + 6 + 6 * 2 + 3


def test_demo_report_trends_of_the_negative_tags_attention_against_w(
    demo_on_tiny: tuple[Study, ReportResult],
) -> None:
    study, result = demo_on_tiny
    path = study.path.parent / "runs" / "pure-negative" / "catalog.sqlite"
    with Catalog.open(path, readonly=True) as catalog:
        w_of = {i["id"]: i["axis_values"]["W"] for i in catalog.images() if i["explanation"]}
        tags = [t for t in catalog.all_tag_measures() if t["window"] == "all" and t["image_id"] in w_of]
    assert len(w_of) == 2 * len(W_VALUES)  # 2 seeds x the W points
    assert {t["tag"] for t in tags} == {f"negative:{tag}" for tag in NOVELAI}
    # Each tag's emphasis weight is the job's W.
    assert all(t["weight"] == pytest.approx(w_of[t["image_id"]]) for t in tags)
    shares: dict[str, list[float]] = {}
    for t in tags:
        shares.setdefault(t["tag"], []).append(t["mass_share"])
    top = sorted(shares, key=lambda k: -float(np.mean(shares[k])))[:6]
    explained = [t for t in result.trends if str(t["plot"]).startswith("explain")]
    trends = {(t["measure"], t["split_value"]): t for t in explained}
    assert {k for k in trends if k[0] != "guidance_difference"} == {
        (measure, tag) for measure in ("mass_share", "spread") for tag in top
    }
    for tag in top:
        mine = [t for t in tags if t["tag"] == tag]
        fit = stats.linregress([w_of[t["image_id"]] for t in mine], [t["mass_share"] for t in mine])
        half = stats.t.ppf(0.975, len(mine) - 2) * fit.stderr
        trend = trends[("mass_share", tag)]
        assert (trend["x"], trend["split"], trend["n"]) == ("W", "tag", len(mine))
        assert _close(trend["slope"], fit.slope)
        assert _close(trend["low"], fit.slope - half) and _close(trend["high"], fit.slope + half)


def test_demo_outcome_tables_have_wilson_intervals(demo_on_tiny: tuple[Study, ReportResult]) -> None:
    study, result = demo_on_tiny
    rows = _catalog_rows(study)
    page = result.html.read_text()
    at_centre = [r for r in rows if r["W"] == 1.0 and r["cfg_scale"] == 7.0]
    counts = Counter((r["size"], r["label"]) for r in at_centre)
    table = re.search(r"<table class='outcomes' data-by='size'>(.*?)</table>", page, re.S)
    assert table is not None
    sizes = re.findall(r"<tr><th>(\d+x\d+)</th><td>(\d+)</td>(.*?)</tr>", table.group(1), re.S)
    assert {s for s, _, _ in sizes} == {r["size"] for r in at_centre} and len(sizes) == 10
    for size, total, cells in sizes:
        assert int(total) == 2
        found = re.findall(r"data-count='(\d+)' data-low='([^']+)' data-high='([^']+)'", cells)
        assert len(found) == len(WORLD_CLASSES)
        for outcome, (count, low, high) in zip(WORLD_CLASSES, found, strict=True):
            assert int(count) == counts[(size, outcome)]
            ci = stats.binomtest(int(count), 2).proportion_ci(confidence_level=0.95, method="wilson")
            assert float(low) == pytest.approx(ci.low, abs=2e-6)
            assert float(high) == pytest.approx(ci.high, abs=2e-6)
    assert {t for t in result.outcome_tables} == {"size", "W", "cfg_scale"}


def test_detector_measures_are_the_detectors_count(demo_on_tiny: tuple[Study, ReportResult]) -> None:
    from voidprompt.demo.detector import DetectorConfig, detect
    from voidprompt.testing.fake_checkpoints import TINY_CONSTANTS

    study, _ = demo_on_tiny
    # Read at the native size the checkpoint's metadata gives, as the labeler does for any model.
    config = DetectorConfig(native_size=TINY_CONSTANTS.vae_sample_size)
    for row in _catalog_rows(study)[::5]:
        with Image.open(row["file"]) as image:
            detection = detect(image, config)
        assert row["detector_objects"] == detection.count
        assert row["detector_defects"] == len(detection.defect_flags)


def test_the_smoke_study_runs_at_the_miniature_models_size_with_the_worlds_classes() -> None:
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.models.info import checkpoint_native_size

    study = load_study(STUDIES / "smoke.toml")
    native = checkpoint_native_size(miniature_model_path())
    sizes = {(j.request.width, j.request.height) for j in study.expand()}
    assert (native, native) in sizes and all(native in size for size in sizes)
    assert label_scheme(study, {}).classes == WORLD_CLASSES

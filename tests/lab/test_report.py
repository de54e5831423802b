"""Reports: HTML with embedded figures, CSV/Parquet exports, outcome tables against Wilson."""

import csv
import re
from collections import Counter
from pathlib import Path

import pytest
from lab_helpers import quiet, study_text

from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.labels import DEFAULT_CLASSES, export_labels, import_labels, label_scheme
from voidprompt.lab.report import ReportResult, build_report
from voidprompt.lab.run import run_study
from voidprompt.lab.stats import wilson_interval
from voidprompt.lab.study import Study, parse_study
from voidprompt.testing.browser import chromium_available, headless_chromium


@pytest.fixture(scope="module")
def ran(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Study:
    folder = tmp_path_factory.mktemp("report")
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="3 random", labels='labeler = "detector"')
    text += '\n[report]\nbase = 16\noutcomes_by = ["size", "W"]\n'
    study = parse_study(text, folder / "t.toml")
    run_study(study, quiet(study))
    return study


@pytest.fixture(scope="module")
def report(ran: Study, tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    """The study's report, built once for the tests that only read it."""
    return build_report(ran, out_dir=tmp_path_factory.mktemp("built") / "r")


def test_report_files_and_html(report: ReportResult) -> None:
    result = report
    out = result.html.parent
    page = result.html.read_text()
    pngs = [f for f in result.figures if f.suffix == ".png"]
    # Self-contained: every PNG figure is embedded (base64), each SVG is linked and exists.
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    # One grid page (size x W, first seed), plots vs size, W and area, outcome figures by size and W.
    assert len(embedded) == len(pngs) == 1 + 3 + 2
    for svg in re.findall(r"href='figures/([^']+\.svg)'", page):
        assert (out / "figures" / svg).is_file()
    assert "[labels]" in page and "voidprompt" in page  # the study file text and version
    with (out / "images.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    assert {r["area"] for r in rows} == {"1.0", "2.0"}  # 16x16 and 32x16 in units of 16^2
    assert result.parquet is not None and result.parquet.is_file()


def test_outcome_tables_match_wilson(ran: Study, report: ReportResult) -> None:
    result = report
    classes = label_scheme(ran).classes
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        sizes = {i["id"]: i["axis_values"]["size"] for i in catalog.images()}
        labels = {i: s["detector"][0] for i, s in catalog.all_labels().items()}
    expected = Counter((sizes[i], labels[i]) for i in labels)
    table = result.outcome_tables["size"]
    assert {r.group for r in table} == {"16x16", "32x16"}
    for row in table:
        assert row.count == expected[(row.group, row.outcome)]
        assert row.total == 6
        assert (row.low, row.high) == pytest.approx(wilson_interval(row.count, 6))
    assert [r.outcome for r in table[: len(classes)]] == list(classes)
    page = result.html.read_text()
    low, high = wilson_interval(table[0].count, 6)
    assert f"data-count='{table[0].count}' data-low='{low:.6f}' data-high='{high:.6f}'" in page


def _catalog(study: Study) -> Path:
    return study.path.parent / "runs" / "t" / "catalog.sqlite"


def test_labels_csv_round_trip(ran: Study, tmp_path: Path) -> None:
    # A copy of the catalog, so the module's run stays untouched for the other tests.
    import shutil

    folder = tmp_path / "runs" / "t"
    shutil.copytree(_catalog(ran).parent, folder)
    (folder / "catalog.sqlite.lock").unlink(missing_ok=True)
    with Catalog.open(folder / "catalog.sqlite") as catalog:
        out = tmp_path / "labels.csv"
        assert export_labels(catalog, out) == 12
        rows = list(csv.DictReader(out.open()))
        assert {r["source"] for r in rows} == {"detector"}
        first = rows[0]
        (tmp_path / "human.csv").write_text(f"job_id,label_class,tags\n{first['job_id']},Legit human,a;b\n")
        assert import_labels(catalog, tmp_path / "human.csv", DEFAULT_CLASSES) == 1
        image_id = catalog.image_id_for(job_id=first["job_id"])
        assert image_id is not None
        assert catalog.labels(image_id)["human"] == ("Legit human", ["a", "b"])
        (tmp_path / "bad.csv").write_text(f"job_id,label_class\n{first['job_id']},Cat\n")
        with pytest.raises(StudyError, match=r"bad\.csv: line 2: label_class 'Cat'"):
            import_labels(catalog, tmp_path / "bad.csv", DEFAULT_CLASSES)


def test_report_option_errors(ran: Study) -> None:
    bad = parse_study(
        ran.toml_text.replace("base = 16", 'base = 16\ngrid = { x = "nope", y = "W" }'), ran.path
    )
    with pytest.raises(StudyError, match="grid #1 x = 'nope': not a column"):
        build_report(bad, catalog_path=_catalog(ran))
    for grid in ('{ x = "size", y = "seed", rows = 0 }', '{ x = "size", y = "seed", colour = 1 }', '"size"'):
        text = ran.toml_text.replace("base = 16", f"base = 16\ngrid = {grid}")
        with pytest.raises(StudyError, match="grid: write grid = "):
            parse_study(text, ran.path)  # the schema checks [report] as it reads the file


def test_grid_pages_and_list_selections(ran: Study, tmp_path: Path) -> None:
    def grids(spec: str) -> list[str]:
        study = parse_study(ran.toml_text.replace("base = 16", f"base = 16\ngrid = {spec}"), ran.path)
        result = build_report(study, catalog_path=_catalog(ran), out_dir=tmp_path / "r")
        page = result.html.read_text()
        names = sorted(p.name for p in (tmp_path / "r" / "figures").glob("grid-*.png"))
        assert len(names) == len(re.findall(r"<img alt='grid \d+", page))
        return re.findall(r"<figcaption>size × seed: ([^<]+)</figcaption>", page)

    # 3 seeds, 2 per page, one grid per W value: 2 pages each.
    assert grids('[{ x = "size", y = "seed", rows = 2 }]') == [
        "W=1.0 (seed 1-2 of 3)", "W=1.0 (seed 3-3 of 3)", "W=1.5 (seed 1-2 of 3)", "W=1.5 (seed 3-3 of 3)"
    ]  # fmt: skip
    # pages = 1 keeps the first page of each; a where list selects any of its values.
    assert grids('[{ x = "size", y = "seed", rows = 2, pages = 1, where = { W = [1.5, 9.0] } }]') == [
        "W=[1.5, 9.0] (seed 1-2 of 3)"
    ]
    # The earlier report's extra grid pages were removed, not left beside the new one.
    assert len(list((tmp_path / "r" / "figures").glob("grid-*.png"))) == 1


@pytest.mark.skipif(not chromium_available(), reason="chromium / chromium-driver / selenium not installed")
def test_report_opens_in_headless_chromium_and_shows_its_figures(
    report: ReportResult, tmp_path: Path
) -> None:
    result = report
    with headless_chromium(tmp_path / "profile") as browser:
        browser.get(result.html.resolve().as_uri())
        # Every figure is decoded and laid out: a broken or missing image has naturalWidth 0.
        sizes = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        browser.save_screenshot(str(tmp_path / "report.png"))
    figures = [f for f in result.figures if f.suffix == ".png"]
    assert len(sizes) >= len(figures)
    assert all(complete and width > 0 and height > 0 for complete, width, height in sizes)


def test_pictures_first_and_who_labelled(ran: Study, report: ReportResult, tmp_path: Path) -> None:
    """The image grids come before the trend, measure and outcome tables; the labelled count says how
    many labels came from a person and how many from each labeler."""
    import shutil

    page = report.html.read_text()
    heads = re.findall(r"<h2>([^<(]+)", page)
    assert [h for h in heads if h != "Trends"] == ["Image grids", "Measures ", "Outcomes", "Reproduce"], heads
    labelled = re.compile(r"<p class='labelled'>([^(]+) \(a person's label wins over a labeler's\)")
    assert labelled.findall(page) == ["12 of 12 images labelled: 12 by the labeler detector"]

    folder = tmp_path / "runs" / "t"
    shutil.copytree(_catalog(ran).parent, folder)
    (folder / "catalog.sqlite.lock").unlink(missing_ok=True)
    with Catalog.open(folder / "catalog.sqlite") as catalog:
        first, second = [i["id"] for i in catalog.images()][:2]
        classes = label_scheme(ran).classes
        catalog.set_label(first, classes[0])
        catalog.set_label(second, classes[-1])
    page = build_report(ran, catalog_path=folder / "catalog.sqlite", out_dir=tmp_path / "r2").html.read_text()
    assert labelled.findall(page) == ["12 of 12 images labelled: 2 by a person, 10 by the labeler detector"]


def test_grid_page_cells_have_borders_and_labels_fit(tmp_path: Path) -> None:
    """Each cell of a grid page is outlined (two neighbours: a 2-pixel line between them), the
    pictures sit inside the outline, and the row labels' margin is wider than their widest line."""
    import numpy as np
    from PIL import Image

    from voidprompt.lab.report.data import ReportData
    from voidprompt.lab.report.figures import BORDER, CELL, image_grid, label_font

    rows = []
    for i, (size, w) in enumerate([("128x128", 1.0), ("128x128", 1.5), ("128x64", 1.0), ("128x64", 1.5)]):
        width, height = map(int, size.split("x"))
        Image.new("RGB", (width, height), (255, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append({"path": f"{i}.png", "size": size, "W": w, "seed": 1, "width": width, "height": height})
    page = np.asarray(
        image_grid(ReportData(rows, ["size", "W", "seed"], [], 64), tmp_path, "W", "size", {}, "t")
    )
    left = page.shape[1] - 2 * CELL
    top = page.shape[0] - 2 * CELL
    widest = max(label_font().getlength(line) for line in ("size=", "128x128", "128x64"))
    assert left > widest + 4
    line = page[top + CELL // 2, left + CELL - 3 : left + CELL + 3].tolist()
    red, white, border = [255, 0, 0], [255, 255, 255], list(BORDER)
    assert line == [red, white, border, border, white, red]  # picture, margin, outlines, margin, picture
    assert page[top, left + 5].tolist() == list(BORDER) and page[
        top + 2 * CELL - 1, left + 5
    ].tolist() == list(BORDER)
    assert page[top + CELL + 10, left + 10].tolist() == [255, 255, 255]  # the landscape picture's margin

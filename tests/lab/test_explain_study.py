"""Studies that capture explanations: the [explain] section, capture on exactly the selected jobs,
the files beside the pictures, their catalog rows and measures, resume, and the report's views."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from lab_helpers import quiet, study_text
from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.explain.measures import guidance_differences, tag_measures
from voidprompt.explain.record import ExplainOptions
from voidprompt.explain.render import overlay
from voidprompt.explain.store import explanation_path, load_explanation
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.report import build_report
from voidprompt.lab.run import plan_batches, run_study
from voidprompt.lab.schema import ExplainSpec, ExplainView
from voidprompt.lab.study import Study, parse_study

# 2 sizes x 2 W x 3 seeds = 12 jobs; capture at 16x16, first 2 seeds: 4 jobs.
EXPLAIN = '[explain]\nwhere = { size = "16x16" }\nseeds = 2\npreview_every = 2\nmap_side = 4\n'


# One small plot beside the explanations: the report's default plots of every measure take seconds.
REPORT = 'grid = { x = "W", y = "seed" }\nplots = [{ x = "W", measures = ["luminance"] }]\n'


def _text(checkpoint: Path, explain: str = EXPLAIN, report: str = "") -> str:
    text = study_text(checkpoint, sizes="16x16, 32x16", seeds="3 random") + explain
    return text + "[report]\n" + REPORT + report


def _catalog(study: Study) -> Path:
    return study.path.parent / "runs" / "t" / "catalog.sqlite"


@pytest.fixture(scope="module")
def ran(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Study:
    """The study, run once with capture (4 of its 12 jobs)."""
    study = parse_study(_text(tiny_checkpoint), tmp_path_factory.mktemp("explained") / "t.toml")
    report = run_study(study, quiet(study, batch_size=4))
    assert (report.generated, report.failed, report.uncaptured) == (12, {}, 0)
    return study


# ----------------------------------------------------------------------------------- the section


def test_the_explain_section_becomes_typed_options(tmp_path: Path) -> None:
    text = "[axes]\nseed = '4 random'\nW = '1, 2'\nsize = '16x16'\n[prompt]\nnegative = '(a:{W})'\n"
    study = parse_study(text + EXPLAIN, tmp_path / "s.toml")
    assert study.explain == ExplainSpec({"size": "16x16"}, 2, False, 2, 4)
    assert parse_study(text, tmp_path / "s.toml").explain is None  # no section: nothing captures
    empty = parse_study(text + "[explain]\n", tmp_path / "s.toml").explain
    assert empty == ExplainSpec({}, None, False, 5, 24)
    assert empty.options() == ExplainOptions(per_token=False, preview_every=5)
    full = parse_study(
        text
        + "[explain]\nwhere = { W = [1, 2] }\nseeds = 3\nper_token = true\npreview_every = 0\nmap_side = 8\n"
        "[report]\nexplain = [{ x = 'W', where = { W = 1 }, tags = 3, window = 'late', "
        "branch = 'negative' }]\n",
        tmp_path / "s.toml",
    )
    assert full.explain == ExplainSpec({"W": [1, 2]}, 3, True, 0, 8)
    assert full.explain.options() == ExplainOptions(per_token=True, preview_every=0)
    assert full.report.explain == (ExplainView("W", {"W": 1}, 3, "late", "negative"),)
    assert parse_study(text + "[report]\nexplain = [{ x = 'W' }]\n", tmp_path / "s.toml").report.explain == (
        ExplainView("W", {}, 6, "all", None),
    )


@pytest.mark.parametrize(
    ("explain", "pattern"),
    [
        ("[explain]\nseds = 2", r"s\.toml: \[explain\] seds: unknown key; allowed: where, seeds, per_token, "
         r"preview_every, map_side; did you mean 'seeds'\?"),
        ("[explain]\nwhere = { WW = 1 }", r"\[explain\] where WW: not an axis of this study; choose one of "
         r"seed, W, width, height; did you mean 'W'\?"),
        ("[explain]\nwhere = 'W'", r"\[explain\] where: write where = \{ size = "),
        ("[explain]\nwhere = { W = { a = 1 } }", r"\[explain\] where W: \{'a': 1\}: write a value or"),
        ("[explain]\nseeds = 0", r"\[explain\] seeds: 0: write a whole number of at least 1, e\.g\."),
        ("[explain]\nseeds = 5", r"\[explain\] seeds: 5 is more than the 4 values of the seed axis; write at "
         r"most 4"),
        ("[explain]\nper_token = 'yes'", r"\[explain\] per_token: 'yes': write true or false"),
        ("[explain]\npreview_every = -1", r"\[explain\] preview_every: -1: write a whole number of at least"),
        ("[explain]\nmap_side = 0", r"\[explain\] map_side: 0: write a whole number of at least 1"),
        ("[report]\nexplain = [{ y = 'W' }]", r"\[report\] explain #1: write explain = \[\{ x = "),
        ("[report]\nexplain = [{ x = 'W', tag = 3 }]", r"\[report\] explain #1 tag: unknown key.*'tags'"),
        ("[report]\nexplain = [{ x = 'W', tags = 0 }]", r"\[report\] explain #1: tags=0: write how many"),
        ("[report]\nexplain = [{ x = 'W', branch = 'neg' }]",
         r"\[report\] explain #1: branch='neg': choose positive or negative"),
    ],
)  # fmt: skip
def test_explain_key_errors_name_the_key_and_the_fix(explain: str, pattern: str, tmp_path: Path) -> None:
    text = "[axes]\nseed = '4 random'\nW = '1, 2'\n[prompt]\nnegative = '(a:{W})'\n"
    with pytest.raises(StudyError, match=pattern):
        parse_study(text + explain, tmp_path / "s.toml")


def test_seeds_need_a_seed_axis(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"\[explain\] seeds: the study has no seed axis .* remove seeds"):
        parse_study(
            "[axes]\nW = '1, 2'\n[prompt]\nnegative = '(a:{W})'\n[explain]\nseeds = 2\n", tmp_path / "s.toml"
        )


# ---------------------------------------------------------------------------- which jobs capture


def test_capture_selects_exactly_the_where_and_first_seeds_and_keeps_job_ids(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    plain = parse_study(_text(tiny_checkpoint, explain=""), tmp_path / "t.toml")
    study = parse_study(_text(tiny_checkpoint), tmp_path / "t.toml")
    jobs = study.expand()
    assert [j.job_id for j in jobs] == [j.job_id for j in plain.expand()]  # capture is no part of a job's id
    seeds = next(a for a in study.axes if a.name == "seed").values
    expected = {j.job_id for j in jobs if j.axis_values["size"] == "16x16" and j.request.seed in seeds[:2]}
    assert len(expected) == 4
    assert study.captures(jobs) == expected
    assert plain.captures(jobs) == frozenset()
    every = parse_study(_text(tiny_checkpoint, explain="[explain]\n"), tmp_path / "t.toml")
    assert every.captures(jobs) == {j.job_id for j in jobs}
    by_width = parse_study(
        _text(tiny_checkpoint, explain="[explain]\nwhere = { width = 32 }\n"), tmp_path / "t.toml"
    )
    assert by_width.captures(jobs) == {j.job_id for j in jobs if j.request.width == 32}


def test_batches_split_at_the_capture_boundary(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = parse_study(_text(tiny_checkpoint), tmp_path / "t.toml")
    jobs = study.expand()
    captures = study.captures(jobs)
    options = study.explain.options() if study.explain else None
    batches = plan_batches(jobs, 16, explain=options, captures=captures)
    # 4 shapes x (2 W): 16x16 groups split into 2 captured + 1 plain job each; 32x16 stays whole.
    assert sorted((len(b.jobs), b.explain is not None) for b in batches) == [
        (1, False), (1, False), (2, True), (2, True), (3, False), (3, False),
    ]  # fmt: skip
    for batch in batches:
        assert all((j.job_id in captures) == (batch.explain is not None) for j in batch.jobs)
        assert batch.explain in (None, options)
        assert batch.part(len(batch.jobs) - 1).explain == batch.explain
    assert all(b.explain is None for b in plan_batches(jobs, 16))
    with pytest.raises(StudyError, match="without the explain options"):
        plan_batches(jobs, 16, captures=captures)


# ----------------------------------------------------------------------------- files and catalog


def test_explanations_are_beside_exactly_the_captured_pictures(ran: Study) -> None:
    captured = ran.captures(ran.expand())
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        images = catalog.images()
        folder = catalog.path.parent
        assert {r["job_id"] for r in images if r["explanation"]} == captured
        for row in images:
            picture = folder / row["path"]
            beside = explanation_path(picture)
            if row["job_id"] in captured:
                assert row["explanation"] == beside.relative_to(folder).as_posix()
                loaded = load_explanation(beside)
                assert loaded.tag_maps.shape[-2:] == (4, 4)  # map_side = 4
                assert {t.key for t in loaded.tags} == {"negative:lowres", "negative:text"}
                assert {t.weight for t in loaded.tags} == {row["axis_values"]["W"]}
                assert loaded.previews and loaded.previews[0].combined.ndim == 3
            else:
                assert row["explanation"] is None and not beside.exists()


def test_catalog_measures_match_the_measures_of_the_loaded_file(ran: Study) -> None:
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        rows = catalog.all_tag_measures()
        measured = catalog.all_measures()
        captured = [r for r in catalog.images() if r["explanation"]]
        for image in captured:
            loaded = load_explanation(catalog.path.parent / image["explanation"])
            mine = [r for r in rows if r["image_id"] == image["id"]]
            expected = tag_measures(loaded)
            assert len(mine) == len(expected) == 2 * 4  # 2 negative tags x 4 windows
            for row, m in zip(mine, expected, strict=True):
                assert (row["tag"], row["branch"], row["part"], row["label"], row["window"]) == (
                    m.tag, m.branch, m.part, m.label, m.window,
                )  # fmt: skip
                assert row["weight"] == pytest.approx(m.weight)
                for name in ("mass_share", "peak_y", "peak_x", "spread"):
                    assert row[name] == pytest.approx(getattr(m, name))
            # Two tags of one prompt share its attention.
            shares = [r["mass_share"] for r in mine if r["window"] == "all"]
            assert sum(shares) == pytest.approx(1.0)
            for window, value in guidance_differences(loaded).items():
                assert measured[image["id"]][f"guidance_difference_{window}"] == pytest.approx(value)
        plain = [r for r in catalog.images() if not r["explanation"]]
        assert not any(k.startswith("guidance_difference") for r in plain for k in measured[r["id"]])
        assert {r["image_id"] for r in rows} == {r["id"] for r in captured}


def test_capture_leaves_the_pictures_as_they_are(ran: Study, tiny_checkpoint: Path, tmp_path: Path) -> None:
    plain = parse_study(_text(tiny_checkpoint, explain=""), tmp_path / "t.toml")
    run_study(plain, quiet(plain, batch_size=4))
    with (
        Catalog.open(_catalog(ran), readonly=True) as captured,
        Catalog.open(_catalog(plain), readonly=True) as reference,
    ):
        theirs = {r["job_id"]: r for r in reference.images()}
        for row in captured.images():
            if not row["explanation"]:
                continue
            other = theirs[row["job_id"]]
            # A captured job runs in a smaller batch than the plain run's (2 instead of 3), which on
            # the CPU may move a level here and there (float summation order); the same batch gives
            # the same bytes, which the engine's own capture tests pin.
            with (
                Image.open(captured.path.parent / row["path"]) as a,
                Image.open(reference.path.parent / other["path"]) as b,
            ):
                difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
            assert difference.max() <= 2
            assert row["infotext"] == other["infotext"]


def test_resume_keeps_and_completes_explanations(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = parse_study(_text(tiny_checkpoint), tmp_path / "t.toml")
    first = run_study(study, quiet(study, batch_size=2, max_jobs=3))
    assert first.generated == 3
    with Catalog.open(_catalog(study), readonly=True) as catalog:
        before = {r["job_id"]: (catalog.path.parent / r["explanation"]).read_bytes()
                  for r in catalog.images() if r["explanation"]}  # fmt: skip
    assert len(before) == 2  # the first batch: the 2 captured jobs of the first W
    again = run_study(study, quiet(study, batch_size=2))
    assert (again.skipped, again.generated, again.uncaptured) == (3, 9, 0)
    with Catalog.open(_catalog(study), readonly=True) as catalog:
        after = {
            r["job_id"]: catalog.path.parent / r["explanation"] for r in catalog.images() if r["explanation"]
        }
        assert set(after) == study.captures(study.expand())
        for job_id, data in before.items():
            assert after[job_id].read_bytes() == data  # not redone
        assert len({r["image_id"] for r in catalog.all_tag_measures()}) == 4
    assert run_study(study, quiet(study)).generated == 0


class Crash(Exception):
    pass


def test_a_crash_after_the_explanation_leaves_no_orphan(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = parse_study(_text(tiny_checkpoint), tmp_path / "t.toml")

    def fault(at: str, job_id: str) -> None:
        if at == "explanation_written":
            raise Crash(job_id)

    with pytest.raises(Crash) as crashed:
        run_study(study, quiet(study, batch_size=2), fault=fault)
    images = _catalog(study).parent / "catalog-images"
    orphan = explanation_path(images / f"{crashed.value.args[0]}.png")
    assert orphan.is_file() and not orphan.with_name(orphan.name.replace(".explain.npz", ".png")).exists()
    report = run_study(study, quiet(study, batch_size=2))
    assert report.generated + report.skipped == 12
    with Catalog.open(_catalog(study), readonly=True) as catalog:
        named = {r["explanation"] for r in catalog.images() if r["explanation"]}
    on_disk = {f"catalog-images/{p.name}" for p in images.glob("*.explain.npz")}
    assert on_disk == named and len(named) == 4


def test_sweep_removes_an_explanation_no_row_names(ran: Study, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(_catalog(ran).parent, folder)
    stray = folder / "catalog-images" / "nobody.explain.npz"
    stray.write_bytes(b"x")
    with Catalog.open(folder / "catalog.sqlite") as catalog:
        assert catalog.last_sweep.orphan_images == 1
        assert not stray.exists()
        assert all((folder / r["explanation"]).is_file() for r in catalog.images() if r["explanation"])


def test_a_new_explain_section_on_a_finished_catalog_says_how_to_capture(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    plain = parse_study(_text(tiny_checkpoint, explain=""), tmp_path / "t.toml")
    run_study(plain, quiet(plain, batch_size=4))
    study = parse_study(_text(tiny_checkpoint), tmp_path / "t.toml")
    report = run_study(study, quiet(study))
    assert (report.generated, report.uncaptured) == (0, 4)
    assert "4 job(s) selected by [explain] were generated before without capture" in report.format()
    assert "--catalog NEW.sqlite" in report.format()


# ---------------------------------------------------------------------------------------- report


def test_the_report_draws_the_heatmap_grid_and_the_attention_plots(ran: Study, tmp_path: Path) -> None:
    result = build_report(ran, out_dir=tmp_path / "r")
    names = {p.name for p in result.figures}
    # The default view: the one axis with several values among the captured images (W).
    for name in ("explain-01-w-heatmaps.png", "explain-01-w-tags.png", "explain-01-w-tags.svg",
                 "explain-01-w-guidance.png", "explain-01-w-guidance.svg"):  # fmt: skip
        assert name in names
    with Image.open(tmp_path / "r" / "figures" / "explain-01-w-heatmaps.png") as grid:
        # 2 W values x 2 tags, 128 px cells right of the longest label (its width in the label font,
        # 12 px to spare) under three 20 px lines of title and column labels.
        from voidprompt.lab.report.figures import label_font

        left, top = int(label_font().getlength("negative:lowres")) + 12, 20 * 3 + 4
        assert grid.size == (left + 2 * 128, top + 2 * 128)
        drawn = np.asarray(grid.convert("RGB"))
    # Cell (W = 1.5, the top tag): the mean of the tag's maps over that W's two captured pictures,
    # over the first of them, on the row's colour scale (the larger of the two cells' maxima).
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        captured = [r for r in catalog.images() if r["explanation"]]
        every = [t for t in catalog.all_tag_measures() if t["window"] == "all"]
        folder = catalog.path.parent
    shares = {
        tag: np.mean([t["mass_share"] for t in every if t["tag"] == tag]) for tag in {t["tag"] for t in every}
    }
    top_tag = max(shares, key=lambda k: shares[k])
    means = {}
    for w in (1.0, 1.5):
        at = [r for r in captured if r["axis_values"]["W"] == w]
        maps = [load_explanation(folder / r["explanation"]) for r in at]
        means[w] = (
            at[0],
            np.mean([e.tag_maps[e.tag_index(top_tag), e.window_index("all")] for e in maps], axis=0),
        )
    vmax = max(float(m.max()) for _, m in means.values())
    first, heat = means[1.5]
    with Image.open(folder / first["path"]) as picture:
        expected = overlay(picture.convert("RGB"), heat, vmax=vmax).resize(
            (124, 124), Image.Resampling.BILINEAR
        )
    cell = drawn[top + 2 : top + 126, left + 128 + 2 : left + 128 + 126]  # the first row: the top tag
    assert np.array_equal(cell, np.asarray(expected))
    page = result.html.read_text()
    assert "<h2>Explanations</h2>" in page and "data-kind='tags'" in page and "data-kind='guidance'" in page
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        tags = catalog.all_tag_measures()
        by_image = {r["id"]: r for r in catalog.images()}
    with (tmp_path / "r" / "explain-by-axis.csv").open() as handle:
        numbers = list(csv.DictReader(handle))
    for w in (1.0, 1.5):
        shares = [t["mass_share"] for t in tags
                  if t["tag"] == "negative:lowres" and t["window"] == "all"
                  and by_image[t["image_id"]]["axis_values"]["W"] == w]  # fmt: skip
        row = next(
            r for r in numbers
            if (r["measure"], r["split_value"], float(r["x_value"])) == ("mass_share", "negative:lowres", w)
        )  # fmt: skip
        assert (int(row["n"]), float(row["mean"])) == (2, pytest.approx(sum(shares) / 2))
        assert float(row["low"]) <= float(row["mean"]) <= float(row["high"])
    assert {(r["measure"], r["split"]) for r in numbers} == {
        ("mass_share", "tag"), ("spread", "tag"), ("guidance_difference", "window"),
    }  # fmt: skip
    assert {r["split_value"] for r in numbers if r["split"] == "window"} == {"all", "early", "middle", "late"}


def test_report_explain_views_choose_tags_window_and_branch(ran: Study, tmp_path: Path) -> None:
    checkpoint = Path(ran.model.checkpoint or "")
    view = "explain = [{ x = 'W', tags = 1, window = 'late', branch = 'negative' }]\n"
    study = parse_study(_text(checkpoint, report=view), ran.path)
    result = build_report(study, out_dir=tmp_path / "r")
    with Catalog.open(_catalog(ran), readonly=True) as catalog:
        late = [t for t in catalog.all_tag_measures() if t["window"] == "late"]
    means = {
        tag: np.mean([t["mass_share"] for t in late if t["tag"] == tag]) for tag in {t["tag"] for t in late}
    }
    top = max(means, key=lambda k: means[k])
    with (tmp_path / "r" / "explain-by-axis.csv").open() as handle:
        plotted = {(r["measure"], r["split_value"]) for r in csv.DictReader(handle)}
    assert {p for p in plotted if p[0] != "guidance_difference"} == {("mass_share", top), ("spread", top)}
    assert any(p.name == "explain-01-w-heatmaps.png" for p in result.figures)
    bad = parse_study(_text(checkpoint, report="explain = [{ x = 'W', window = 'hires' }]\n"), ran.path)
    with pytest.raises(
        StudyError,
        match=r"explain #1 window = 'hires': no captured image has that step window; "
        r"choose one of all, early, middle, late",
    ):
        build_report(bad, out_dir=tmp_path / "bad")
    wrong_axis = parse_study(_text(checkpoint, report="explain = [{ x = 'WW' }]\n"), ran.path)
    with pytest.raises(StudyError, match=r"\[report\] explain #1 x = 'WW': not a column"):
        build_report(wrong_axis, out_dir=tmp_path / "bad")


def test_a_report_without_captures_has_no_explanations_section(tiny_checkpoint: Path, tmp_path: Path) -> None:
    plain = parse_study(_text(tiny_checkpoint, explain=""), tmp_path / "t.toml")
    run_study(plain, quiet(plain, batch_size=4, max_jobs=4))
    result = build_report(plain, out_dir=tmp_path / "r")
    assert "Explanations" not in result.html.read_text()
    assert not any(p.name.startswith("explain") for p in result.figures)


def test_the_command_line_runs_shows_and_says_what_lacks_capture(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from voidprompt.lab.cli import main

    study = tmp_path / "t.toml"
    study.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1"))
    assert main(["run", str(study), "--no-progress"]) == 0
    capsys.readouterr()
    study.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1, 2") + "[explain]\n")
    assert main(["run", str(study), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # The first run's 2 jobs (seed 1) are done without capture; the 2 new ones (seed 2) capture.
    assert "2 images in" in out and "2 were already done" in out
    assert "2 job(s) selected by [explain] were generated before without capture" in out
    with Catalog.open(tmp_path / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        captured = [r for r in catalog.images() if r["explanation"]]
    assert [r["seed"] for r in captured] == [2, 2]
    assert main(["show", str(study), captured[0]["job_id"]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["explanation"] == captured[0]["explanation"]
    assert {(t["tag"], t["window"]) for t in shown["tag_measures"]} == {
        (tag, window)
        for tag in ("negative:lowres", "negative:text")
        for window in ("all", "early", "middle", "late")
    }
    assert "guidance_difference_all" in shown["measures"]

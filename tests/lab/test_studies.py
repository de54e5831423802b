"""The shipped study files: the demo study's design, and its report on a tiny checkpoint."""

from pathlib import Path

import pytest

from voidprompt.lab.labels import WORLD_CLASSES, label_scheme
from voidprompt.lab.report import build_report, report_options
from voidprompt.lab.run import run_study
from voidprompt.lab.study import load_study, parse_study

STUDIES = Path(__file__).resolve().parents[2] / "studies"


def test_pure_negative_design() -> None:
    study = load_study(STUDIES / "pure-negative.toml")
    jobs = study.expand()
    assert len(jobs) == 170
    sizes = {(j.request.width, j.request.height) for j in jobs}
    # aspect512(base=64, unit=8): 1:1 at 0.5/1/2/4x, then 1:4, 1:2, 2:1, 4:1 at 1x.
    assert sizes == {(40, 40), (64, 64), (88, 88), (128, 128), (32, 128), (40, 88), (88, 40), (128, 32)}
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    assert all(j.request.prompt == "" for j in jobs)
    negative = next(j.request.negative_prompt for j in jobs if j.axis_values["W"] == 1.6)
    assert negative.startswith("(lowres:1.6), (bad anatomy:1.6)") and negative.endswith("(artist name:1.6)")
    assert sum(w * h for w, h in ((j.request.width, j.request.height) for j in jobs)) / 4096 == pytest.approx(
        200.0, abs=1.0
    )
    assert label_scheme(study).classes == WORLD_CLASSES
    assert report_options(study).base == 64


def test_pure_negative_report_on_tiny(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = (STUDIES / "pure-negative.toml").read_text()
    text = text.replace("steps = 20", "steps = 1").replace('seed = "10 random"', 'seed = "1 random"')
    text += f'\n[model]\ncheckpoint = "{tiny_checkpoint}"\n'
    study = parse_study(text, tmp_path / "pure-negative.toml")
    report = run_study(study, progress=False)
    assert report.generated == 17
    result = build_report(study)
    assert set(result.outcome_tables) == {"size", "W", "cfg_scale"}
    assert {r.group for r in result.outcome_tables["W"]} == {0.9, 1.0, 1.1, 1.3, 1.6, 2.0}
    assert all(r.total == 1 for r in result.outcome_tables["W"])
    assert sum(r.total for r in result.outcome_tables["size"]) == 8 * len(WORLD_CLASSES)
    assert result.html.is_file()

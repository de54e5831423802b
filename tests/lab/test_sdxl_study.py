"""Studies for SDXL: its base and buckets in the size helpers, Pony's quality prefix, and a study on
the tiny SDXL file that runs, resumes and reports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lab_helpers import quiet

from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.report import build_report
from voidprompt.lab.run import run_study
from voidprompt.lab.schema import PONY_QUALITY_TAGS, expand_pony_quality, pony_quality_prefix
from voidprompt.lab.sizes import SDXL_BASE, SDXL_BUCKETS, aspect512, named_base
from voidprompt.lab.study import load_study, parse_study
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

REPO = Path(__file__).resolve().parents[2]
PONY_STUDY = REPO / "studies" / "pony-quality-prefix.toml"
PREFIX = "score_9, score_8_up, score_7_up, score_6_up, score_5_up, score_4_up"

# The SDXL paper's (arXiv:2307.01952) appendix I buckets that Stability's SDXL 1.0 API accepted,
# written out by hand as (width, height).
PAPER_NINE = {
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
    (1536, 640), (640, 1536),
}  # fmt: skip


def test_sdxl_buckets() -> None:
    assert set(SDXL_BUCKETS) == PAPER_NINE and len(SDXL_BUCKETS) == 9
    for width, height in SDXL_BUCKETS:
        # The paper's bucket rule: sides in steps of 64, pixel count close to (never over) 1024^2.
        assert width % 64 == 0 and height % 64 == 0
        assert 0.93 * 1024**2 <= width * height <= 1024**2
        assert (height, width) in SDXL_BUCKETS
    assert SDXL_BUCKETS[0] == (1024, 1024)


def test_sdxl_base() -> None:
    assert SDXL_BASE == 1024
    assert named_base("sdxl") == 1024 and named_base("SD1") == 512 and named_base(768) == 768
    for bad in ("sdx", 0, True, 1.5):
        with pytest.raises(StudyError, match="base="):
            named_base(bad)
    # aspect512 at SDXL's base: sqrt(1024^2*4/3) = 1182.4 -> 1152, sqrt(1024^2*3/4) = 886.8 -> 832.
    assert aspect512(4, 3, base=SDXL_BASE) == (1152, 832)
    assert aspect512(1, 1, base=SDXL_BASE) == (1024, 1024)


def _sizes(tmp_path: Path, size: str) -> list[tuple[int, int]]:
    text = f'[prompt]\npositive = "x"\n[axes]\nsize = {size}\n'
    return [(j.request.width, j.request.height) for j in parse_study(text, tmp_path / "s.toml").expand()]


def test_sdxl_sizes_in_a_study_file(tmp_path: Path) -> None:
    assert _sizes(tmp_path, '"sdxl buckets"') == list(SDXL_BUCKETS)
    assert _sizes(tmp_path, '"SDXL  Buckets, 512x512"') == [*SDXL_BUCKETS, (512, 512)]
    # The named base stands where a number of pixels does; the same sizes either way.
    named = _sizes(tmp_path, '{ values = "1:1 @ 1, 4:3 @ 1, 16:9 @ 1.5", base = "sdxl" }')
    assert named == _sizes(tmp_path, '{ values = "1:1 @ 1, 4:3 @ 1, 16:9 @ 1.5", base = 1024 }')
    assert named[:2] == [(1024, 1024), (1152, 832)]
    assert _sizes(tmp_path, '{ aspects = ["1:1"], base = "sd1" }') == [(512, 512)]
    with pytest.raises(StudyError, match=r"\[axes\] size: base='xl'"):
        _sizes(tmp_path, '{ values = "1:1", base = "xl" }')
    text = (
        '[prompt]\npositive = "x"\n[report]\nbase = "sdxl"\n'
        '[cfg_by_area]\nbase = "sdxl"\npoints = [[1, 5], [2, 9]]\n'
    )
    study = parse_study(text, tmp_path / "s.toml")
    assert study.report.base == 1024
    assert study.cfg_by_area is not None and study.cfg_by_area.base == 1024
    # 1024x1024 is 1x SDXL's area: the first point's CFG.
    assert study.expand()[0].request.cfg_scale == 5.0


def test_pony_quality_prefix() -> None:
    assert ", ".join(PONY_QUALITY_TAGS) == PREFIX
    assert [pony_quality_prefix(n) for n in range(7)] == [
        "", "score_9", "score_9, score_8_up", "score_9, score_8_up, score_7_up",
        "score_9, score_8_up, score_7_up, score_6_up",
        "score_9, score_8_up, score_7_up, score_6_up, score_5_up", PREFIX,
    ]  # fmt: skip
    assert expand_pony_quality("{pony_quality}, 1girl", 2) == "score_9, score_8_up, 1girl"
    # No tags: the placeholder goes with the comma joining it, so the prompt is exactly the rest.
    assert expand_pony_quality("{pony_quality}, 1girl, solo", 0) == "1girl, solo"
    assert expand_pony_quality("1girl ,  {pony_quality}", 0) == "1girl"
    assert expand_pony_quality("{pony_quality}", 0) == ""
    for bad in (7, -1, 1.5, "3"):
        with pytest.raises(StudyError, match=r"0\.\.6"):
            pony_quality_prefix(bad)


def test_pony_quality_in_a_study_file(tmp_path: Path) -> None:
    base = '[prompt]\npositive = "{pony_quality}, 1girl"\nnegative = "{pony_quality}, bad"\n'
    jobs = parse_study(base + '[axes]\npony_quality = "0-6"\n', tmp_path / "p.toml").expand()
    assert [j.axis_values["pony_quality"] for j in jobs] == list(range(7))
    assert jobs[0].request.prompt == "1girl" and jobs[0].request.negative_prompt == "bad"
    assert jobs[3].request.prompt == "score_9, score_8_up, score_7_up, 1girl"
    assert jobs[6].request.prompt == PREFIX + ", 1girl"
    fixed = parse_study(base + "[variables]\npony_quality = 1\n", tmp_path / "p.toml").expand()
    assert [j.request.prompt for j in fixed] == ["score_9, 1girl"]
    with pytest.raises(StudyError, match=r"\[axes\] pony_quality: .*0\.\.6"):
        parse_study(base + '[axes]\npony_quality = "0-7"\n', tmp_path / "p.toml")
    with pytest.raises(StudyError, match=r"\[variables\] pony_quality: .*0\.\.6"):
        parse_study(base + '[variables]\npony_quality = "high"\n', tmp_path / "p.toml")
    # Like every variable, it must be used: an unused axis is a mistake, not six identical images.
    with pytest.raises(StudyError, match="pony_quality"):
        parse_study('[prompt]\npositive = "1girl"\n[axes]\npony_quality = "0-6"\n', tmp_path / "p.toml")


def test_the_shipped_pony_study() -> None:
    text = PONY_STUDY.read_text(encoding="utf-8")
    study = parse_study(text, PONY_STUDY)
    jobs = study.expand()
    assert len(jobs) == 7 * 9 * 4
    assert {(j.request.width, j.request.height) for j in jobs} == set(SDXL_BUCKETS)
    prompts = {j.axis_values["pony_quality"]: j.request.prompt for j in jobs}
    assert prompts[0] == "source_anime, 1girl, solo, smile, looking at viewer, outdoors"
    assert prompts[6] == PREFIX + ", " + prompts[0]
    assert study.report.base == 1024


def test_a_study_on_the_tiny_sdxl_file_runs_resumes_and_reports(tmp_path: Path) -> None:
    """The shipped Pony study shrunk to the tiny SDXL file: 2 prefixes x 2 seeds at 64x64, 2 steps."""
    checkpoint = write_tiny_sdxl_checkpoint(tmp_path / "tiny-xl.safetensors")
    text = PONY_STUDY.read_text(encoding="utf-8")
    replacements = {
        r'(?m)^checkpoint = ".*"$': f'checkpoint = "{checkpoint}"',
        r'(?m)^pony_quality = ".*"$': 'pony_quality = "0, 2"',
        r'(?m)^size = ".*"$': 'size = "64x64"',
        r'(?m)^seed = ".*"$': 'seed = "2 random"',
        r"(?m)^steps = \d+$": "steps = 2",
        r'size = "1024x1024"': 'size = "64x64"',
    }
    for pattern, new in replacements.items():
        text, found = re.subn(pattern, new, text)
        assert found == 1, f"studies/pony-quality-prefix.toml changed its layout: {pattern}"
    (tmp_path / "pony.toml").write_text(text, encoding="utf-8")
    study = load_study(tmp_path / "pony.toml")

    first = run_study(study, quiet(study, batch_size=2))
    assert (first.total, first.generated, first.skipped) == (4, 4, 0)
    again = run_study(study, quiet(study, batch_size=2))
    assert (again.generated, again.skipped) == (0, 4)
    with Catalog.open(first.catalog_path, readonly=True) as catalog:
        rows = catalog.images()
    assert len(rows) == 4
    for row in rows:
        assert (row["width"], row["height"]) == (64, 64)
        infotext = row["infotext"]
        if row["axis_values"]["pony_quality"] == 2:
            assert infotext.startswith("score_9, score_8_up, source_anime, 1girl")
        else:
            assert infotext.startswith("source_anime, 1girl")
        assert "Clip skip: 2" in infotext and "Model: tiny-xl" in infotext

    result = build_report(study, out_dir=tmp_path / "report")
    assert result.html.is_file()
    html = result.html.read_text(encoding="utf-8")
    assert "pony_quality" in html and result.figures

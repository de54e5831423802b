"""The study file's schema: typed options with their defaults, key errors, and the user's reference."""

import hashlib
import re
from pathlib import Path

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab import schema
from voidprompt.lab.schema import (
    GridSpec,
    LabelOptions,
    ModelRef,
    PlotSpec,
    ReportOptions,
    RunOptions,
    workers_arg,
)
from voidprompt.lab.study import parse_study

DOCS = Path(__file__).resolve().parents[2] / "docs" / "study-format.md"


def test_a_study_of_one_empty_table_has_every_default(tmp_path: Path) -> None:
    study = parse_study("[study]\n", tmp_path / "empty.toml")
    assert (study.name, study.description) == ("empty", "")
    # The master seed derives from the name: sha256("voidprompt study <name>"), first 4 bytes.
    digest = hashlib.sha256(b"voidprompt study empty").digest()
    assert study.master_seed == int.from_bytes(digest[:4], "big") % 4294967294
    assert study.model == ModelRef(None, None)  # the installed default model, its own VAE
    # No batch size: 16 on the CPU, free memory's choice on a GPU (RunOptions.batch_cap).
    assert study.run == RunOptions(batch_size=None, threads=None, device=None, precision="auto")
    assert (study.run.compile, study.run.deterministic) == (False, False)
    assert study.labels == LabelOptions(classes=None, labeler=None)
    assert study.report == ReportOptions(base=512, grids=None, outcomes_by=None, plots=None)
    assert (study.positive, study.negative, study.cfg_by_area) == ("", "", None)


def test_sections_become_typed_options(tmp_path: Path) -> None:
    text = """
[run]
batch_size = 4
threads = 2
workers = "auto"
[labels]
classes = ["a", "b"]
labeler = "none"
[report]
base = 64
grid = { x = "W", y = "seed", rows = 3 }
outcomes_by = ["W", { by = "size", where = { W = 1.0 } }]
[[report.plots]]
x = "W"
measures = ["luminance"]
"""
    study = parse_study(text, tmp_path / "s.toml")
    assert study.run == RunOptions(batch_size=4, threads=2, workers="auto")
    assert parse_study("[run]\nworkers = 3", tmp_path / "s.toml").run.workers == 3
    assert study.labels == LabelOptions(("a", "b"), "none")
    assert study.report == ReportOptions(
        64,
        (GridSpec("W", "seed", {}, 3, None),),
        (("W", {}), ("size", {"W": 1.0})),
        (PlotSpec("W", None, {}, ("luminance",)),),
    )


def test_run_options_take_the_callers_flags_over_the_file() -> None:
    from_file = RunOptions(batch_size=32, threads=1)
    # A flag left out (None) keeps the file's value.
    assert from_file.override(batch_size=None, threads=None, max_jobs=8) == RunOptions(32, 1, max_jobs=8)
    assert from_file.override(batch_size=4, executor="ray").batch_size == 4
    with pytest.raises(StudyError, match=r"executor='dask': choose one of local, ray"):
        from_file.override(executor="dask")
    with pytest.raises(StudyError, match=r"precision='half': choose one of auto, fp32, fp16, bf16"):
        from_file.override(precision="half")
    with pytest.raises(StudyError, match=r"batch_size=0: must be at least 1"):
        from_file.override(batch_size=0)
    assert from_file.override(workers=workers_arg("4")).workers == 4
    assert from_file.override(workers=workers_arg("auto")).workers == "auto"
    with pytest.raises(StudyError, match=r"workers='many': write a whole number of at least 1, or 'auto'"):
        from_file.override(workers=workers_arg("many"))
    with pytest.raises(StudyError, match=r"workers=0: write a whole number of at least 1"):
        from_file.override(workers=workers_arg("0"))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[run]\nbatch_sise = 4", r"s\.toml: \[run\] batch_sise: unknown key; allowed: batch_size, threads, "
         r"workers, device, precision, compile, channels_last, deterministic; did you mean 'batch_size'\?"),
        ("[run]\nworkers = 0",
         r'\[run\] workers: 0: write a whole number of at least 1, e\.g\. workers = 2, or workers = "auto"'),
        ("[run]\nworkers = 'all'", r"\[run\] workers: 'all': write a whole number"),
        ("[run]\nprecision = 'fp8'", r"\[run\] precision: 'fp8': choose auto or fp32 or fp16 or bf16"),
        ("[run]\ndeterministic = 'yes'", r"\[run\] deterministic: 'yes': write true or false"),
        ("[run]\ndevice = 0", r"\[run\] device: write a torch device name"),
        ("[run]\nthreads = 0", r"\[run\] threads: 0: write a whole number of at least 1"),
        ("[run]\nbatch_size = 2.5", r"\[run\] batch_size: 2\.5: write a whole number"),
        ("[labels]\nlabler = 'none'", r"\[labels\] labler: unknown key.*did you mean 'labeler'"),
        ("[labels]\nclasses = ['a', 'a']", r"\[labels\] classes: write distinct names"),
        ("[labels]\nlabeler = 3", r"\[labels\] labeler: write a name"),
        ("[report]\ngrdi = 1", r"\[report\] grdi: unknown key.*did you mean 'grid'"),
        ("[report]\nbase = true", r"\[report\] base: base=True: write a whole number of pixels .* \"sdxl\""),
        ("[report]\nplots = [{ x = 'W' }, { y = 'W' }]", r"\[report\] plots #2: write \{ x = "),
        ("[report]\noutcomes_by = [3]", r"\[report\] outcomes_by: write axis names or tables"),
        ("[study]\nnmae = 'x'", r"\[study\] nmae: unknown key.*did you mean 'name'"),
        ("[study]\nmaster_seed = -1", r"\[study\] master_seed: -1: write a whole number of at least 0"),
        ("[model]\ncheckpoint = 1", r"\[model\] checkpoint: write a file name"),
        ("[prompt]\nnegativ = 'x'", r"\[prompt\] negativ: unknown key.*did you mean 'negative'"),
        ("[prompt]\nnegative_step = { tags = 'a', wieght = 2 }",
         r"\[prompt\] negative_step wieght: unknown key; allowed: tags, weight; did you mean 'weight'"),
        ("[prompt]\nnegative = 'a'\nnegative_step = { tags = 'a' }", r"give either negative or negative_"),
        ("[cfg_by_area]\nmode = 'linear'", r"\[cfg_by_area\] points: missing or empty"),
        ("[cfg_by_area]\npoints = [[1, 7]]\nmode = 'smooth'", r"area\] mode: 'smooth': choose linear or"),
        ("[axes]\nsize = { values = '64x64', bsae = 64 }", r"\[axes\] size bsae: unknown key.*mean 'base'"),
        ("[run]\n[run.more]\nx = 1", r"\[run\] more: unknown key"),
    ],
)  # fmt: skip
def test_key_errors_name_the_file_the_key_and_the_fix(text: str, pattern: str) -> None:
    with pytest.raises(StudyError, match=pattern):
        parse_study(text, "s.toml")


def _doc_sections() -> dict[str, str]:
    """The reference's text under each ``## `[section]` `` heading, by section name."""
    parts = re.split(r"(?m)^## ", DOCS.read_text(encoding="utf-8"))
    found = {}
    for part in parts[1:]:
        heading = re.match(r"`\[\[?([a-z_]+)\]\]?`", part)
        if heading:
            found[heading[1]] = part
    return found


def test_the_reference_names_every_section_and_key() -> None:
    sections = _doc_sections()
    assert list(sections) == list(schema.SECTIONS)  # in the order the schema lists them
    for section, keys in schema.KEYED_SECTIONS.items():
        for key in keys:
            assert f"| `{key.name}` |" in sections[section], f"[{section}] {key.name} is not documented"
    special = [*schema.SIZE_AXES, *schema.SEED_AXES, *schema.MODEL_AXES, *schema.PROMPT_AXES, *schema.SR_AXES]
    nested = [*schema.SIZE_TABLE_KEYS, *schema.PROMPT_MATRIX_KEYS, *schema.PROMPTS_FILE_KEYS]
    for name in [*special, *schema.AXIS_ALIASES, *nested]:
        assert f"`{name}`" in sections["axes"], f"the axis word {name!r} is not documented"
    for name in [*schema.GRID_KEYS, *schema.PLOT_KEYS, *schema.EXPLAIN_VIEW_KEYS]:
        assert f"`{name}`" in sections["report"], f"[report] {name} is not documented"
    for name in schema._NOT_SETTINGS:
        assert f"`{name}`" in sections["settings"], f"why {name} is not a setting is not documented"

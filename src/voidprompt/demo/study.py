"""The demo study end to end: run (resumable, detector pre-labels), then the report.

``voidprompt demo`` (the README's main command, ``make demo``) calls :func:`run_demo` on
``pure-negative.toml`` beside this module: the study brief's pure-negative-prompt study on the
miniature model.
A rerun skips every image already in the catalog and rebuilds the report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from voidprompt.errors import StudyError, require_extra
from voidprompt.lab.report import ReportResult, build_report
from voidprompt.lab.run import RunReport, run_study
from voidprompt.lab.study import load_study

# Shipped inside the package (package data), so `voidprompt demo` works from an installed wheel.
DEMO_STUDY = Path(__file__).resolve().parent / "pure-negative.toml"
DEFAULT_OUT = Path("outputs") / "pure-negative"


def default_demo_study() -> Path:
    """The demo study shipped with the package (``voidprompt/demo/pure-negative.toml``)."""
    if not DEMO_STUDY.is_file():
        raise StudyError(
            f"the demo study is missing from the installed package ({DEMO_STUDY}); reinstall voidprompt "
            "or pass --study path/to/study.toml"
        )
    return DEMO_STUDY


@dataclass
class DemoResult:
    study: Path
    run: RunReport
    report: ReportResult
    seconds: float  # run + report, wall clock

    def format(self) -> str:
        done = self.run.skipped + self.run.generated
        return (
            f"study {self.study}: {self.run.total} jobs, {done} images in the catalog "
            f"({self.run.generated} generated now, {self.run.skipped} already done)\n"
            f"run: {self.run.format()}\n"
            f"run + report: {self.seconds / 60:.1f} min\n"
            f"report: {self.report.html}"
        )


def run_demo(
    study_path: str | Path | None = None,
    out_dir: str | Path = DEFAULT_OUT,
    *,
    batch_size: int | None = None,
    threads: int | None = None,
    workers: int | str | None = None,
    device: str | None = None,
    precision: str | None = None,
    progress: bool = True,
) -> DemoResult:
    """Run ``study_path`` (default: the demo study) into ``out_dir``/catalog.sqlite, report into
    ``out_dir``/report. ``batch_size``, ``threads``, ``workers``, ``device`` and ``precision``
    default to the study's ``[run]`` table."""
    started = time.perf_counter()
    # The report comes after a run of minutes: refuse before the run, not after it.
    require_extra("matplotlib", "lab", "voidprompt demo's report")
    study = load_study(study_path if study_path is not None else default_demo_study())
    out = Path(out_dir)
    catalog = out / "catalog.sqlite"
    options = study.run.override(
        batch_size=batch_size,
        threads=threads,
        workers=workers,
        device=device,
        precision=precision,
        catalog=catalog,
        progress=progress,
    )
    run = run_study(study, options)
    report = build_report(study, catalog_path=catalog, out_dir=out / "report")
    return DemoResult(study.path, run, report, time.perf_counter() - started)

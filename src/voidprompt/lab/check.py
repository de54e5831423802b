"""What ``voidprompt study check`` checks beyond reading a study file: its labeler and the labeler's
files, its model files and its report's columns - what a run would refuse, found without loading
weights - and the summary it prints, with the time estimated from a catalog's pictures. The command,
the study designer and the server's queue all check a study here."""

from __future__ import annotations

from pathlib import Path

from voidprompt.errors import StudyError, did_you_mean
from voidprompt.lab.catalog import GUIDANCE_MEASURE, Catalog
from voidprompt.lab.labels import label_scheme
from voidprompt.lab.measures import MEASURES
from voidprompt.lab.plugins import Plugins, installed_plugins
from voidprompt.lab.report.data import DERIVED, SEED_AXES
from voidprompt.lab.run import model_files
from voidprompt.lab.schema import JOB_COLUMNS
from voidprompt.lab.study import Study, StudySummary, summarize

__all__ = ["check_report_columns", "check_study"]


def check_study(
    study: Study, catalog_path: Path | None = None, plugins: Plugins | None = None
) -> StudySummary:
    """What ``voidprompt study check`` checks beyond reading the file - its labeler and the
    labeler's files, its model files, its report's columns: what a run would refuse, without
    loading weights - then its summary, the time estimated from ``catalog_path``'s images."""
    plugins = installed_plugins() if plugins is None else plugins
    scheme = label_scheme(study, plugins)
    if scheme.labeler is not None:
        # A labeler may check its files (a tagger's) here; a run would refuse them at its first picture.
        check_files = getattr(plugins.labeler(scheme.labeler, study.labels), "check", None)
        try:
            if callable(check_files):
                check_files()
        except StudyError as error:
            raise StudyError(f"{study.path}: {error}") from None
    model_files(study, [job.model for job in study.expand()], plugins)
    check_report_columns(study)
    seconds, steps, done = _measured_speed(catalog_path) if catalog_path else (None, None, set[str]())
    return summarize(study, seconds, steps, done)


def _measured_speed(catalog_path: Path) -> tuple[float | None, int | None, set[str]]:
    """Seconds per pixel at the catalog's steps, from images already generated (median of them),
    and the ids of the jobs that have their picture."""
    if not catalog_path.exists():
        return None, None, set()
    with Catalog.open(catalog_path, readonly=True) as catalog:
        images = catalog.images()
    done = {i["job_id"] for i in images}
    samples = [
        (i["timings"].get("total", 0.0) / (i["width"] * i["height"]), int(i["settings"]["steps"]))
        for i in images
        if i["timings"].get("total")
    ]
    if not samples:
        return None, None, done
    samples.sort()
    seconds, steps = samples[len(samples) // 2]
    return seconds, steps, done


def check_report_columns(study: Study) -> None:
    """The [report] views name axes that exist: what the report would refuse after the whole run
    (each view's x, y, split, where and outcomes_by), refused before it. A column the report
    knows only from the catalog's measures passes when it can be one: a standard measure, a
    labeler's own (named after the labeler) or the explanation's guidance measures."""
    names = [a.name for a in study.axes] + [a.name for point in study.points for a in point]
    known = [*dict.fromkeys(names), *SEED_AXES, *DERIVED, *JOB_COLUMNS, "label", *MEASURES]
    known = list(dict.fromkeys(known))
    prefixes = tuple(f"{name}_" for name in (study.labels.labeler, GUIDANCE_MEASURE) if name)

    def check(column: str | None, where: str) -> None:
        if column is None or column in known or column.startswith(prefixes):
            return
        raise StudyError(
            f"{study.path}: [report] {where} = {column!r}: not an axis or measure of this study; choose "
            f"one of {', '.join(known)}{did_you_mean(column, known)}"
        )

    report = study.report
    named: list[tuple[str | None, str]] = []
    for number, grid in enumerate(report.grids or (), start=1):
        named += [(grid.x, f"grid #{number} x"), (grid.y, f"grid #{number} y")]
        named += [(key, f"grid #{number} where") for key in grid.where]
    for number, plot in enumerate(report.plots or (), start=1):
        named += [(plot.x, f"plots #{number} x"), (plot.split, f"plots #{number} split")]
        named += [(key, f"plots #{number} where") for key in plot.where]
    for by, selection in report.outcomes_by or ():
        named += [(by, "outcomes_by"), *((key, "outcomes_by where") for key in selection)]
    for number, view in enumerate(report.explain or (), start=1):
        named += [(view.x, f"explain #{number} x")]
        named += [(key, f"explain #{number} where") for key in view.where]
    for column, where in named:
        check(column, where)

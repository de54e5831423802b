"""Run a study: pending jobs -> same-shape batches -> images on disk -> catalog rows.

Per image, in this order (the catalog's resumable protocol): generate, write to a temporary name,
rename into place, then commit one transaction holding its row, its measures and its pre-label.
A rerun skips every committed job; killing the process at any moment loses at most the batch in
flight (its renamed-but-uncommitted files are swept by the next ``Catalog.open``).

Batching: jobs that differ only in their seeds share one sampler run (one UNet call per step for
the whole batch), each image with its own seed. A1111 gives image ``i`` of a batch the seed
``seed + i``; a study's seeds are arbitrary (``"8 random"``), so
:func:`voidprompt.lab.execution.generate_batch` passes the seed list itself. Prompts are encoded
once each by the Engine's ``PromptEncoder`` cache and never together with another prompt (A1111's
mean restoration spans the encoded batch).

Failures: a batch the Engine rejects (or that runs out of memory) fails as a whole, as one A1111
generation does: its jobs are marked failed in the catalog and the study goes on; so does a job
whose picture cannot be saved, measured or labelled (a ``VoidpromptError``). The run report and
``study ls`` count them, and a rerun retries them. Every model file is checked before the first
batch, as A1111's X/Y/Z plot checks its checkpoints before generating.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import PngImagePlugin
from tqdm import tqdm

from voidprompt.errors import StudyError, VoidpromptError
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import Catalog, default_catalog_path, sha256_file
from voidprompt.lab.execution import Batch, Executor, Generated, LocalExecutor
from voidprompt.lab.labels import Labeler, label_image, label_scheme
from voidprompt.lab.measures import measure_image
from voidprompt.lab.plugins import ModelFiles, Plugins, installed_plugins
from voidprompt.lab.ray_executor import RayExecutor
from voidprompt.lab.schema import ModelRef, RunOptions, StudyFile
from voidprompt.lab.study import Job, Study, request_to_dict
from voidprompt.request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    catalog_path: Path
    total: int  # jobs in the study
    skipped: int  # already done before this run
    generated: int
    batches: int
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)  # job id -> why, for this run's failures

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.generated / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        text = (
            f"{self.generated} images in {self.batches} batches, {self.seconds:.1f} s "
            f"({self.images_per_minute:.1f} images/min); {self.skipped} were already done; "
            f"{len(self.failed)} failed; catalog {self.catalog_path}"
        )
        if self.failed:
            job, reason = next(iter(self.failed.items()))
            text += f"\nfirst failure (job {job}): {reason}\nrun the study again to retry the failed jobs"
        return text


# ------------------------------------------------------------------------------------- planning


def batch_key(job: Job) -> tuple[ModelRef, GenerationRequest]:
    """What must be equal for two jobs to share a sampler run: the model and all but the seeds."""
    return job.model, job.request.replace(seed=0, subseed=0, extra_generation_params={})


def plan_batches(jobs: Sequence[Job], batch_size: int) -> list[Batch]:
    """Group jobs by :func:`batch_key` (in order of first appearance) and cut groups to ``batch_size``."""
    if batch_size < 1:
        raise StudyError(f"batch_size={batch_size}: must be at least 1")
    groups: dict[tuple[ModelRef, GenerationRequest], list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job), []).append(job)
    batches = []
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = tuple(members[start : start + batch_size])
            batches.append(Batch(chunk[0].model, chunk[0].request, chunk))
    return batches


def model_files(study: StudyFile, models: Sequence[ModelRef], plugins: Plugins) -> dict[ModelRef, ModelFiles]:
    """The files of every model, each checked to exist (a missing one is an error naming the study)."""
    files = {}
    for model in dict.fromkeys(models):
        try:
            files[model] = plugins.resolve_model(model, study.path.parent)
        except VoidpromptError as error:
            raise StudyError(f"{study.path}: {error}") from None
    return files


# ---------------------------------------------------------------------------------------- writer

Fault = Callable[[str, str], None]  # (stage, job_id): tests raise here to simulate a crash


def store(
    catalog: Catalog,
    generated: Generated,
    job: Job,
    *,
    labeler: Labeler | None = None,
    fault: Fault | None = None,
) -> int:
    """Write one image by the resumable protocol and commit it with its measures and pre-label."""
    final = catalog.images_dir / f"{job.job_id}.png"
    if fault:
        fault("before_write", job.job_id)

    def write(temp: Path) -> None:
        # The infotext goes where A1111 puts it (the PNG "parameters" text chunk). Saved here, not
        # via imagemeta.save_png, so a test's fault can strike between the write and the rename.
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", generated.infotext)
        generated.image.save(temp, format="PNG", pnginfo=info)
        if fault:
            fault("temp_written", job.job_id)

    atomic_write(final, write)
    if fault:
        fault("renamed", job.job_id)
    values = measure_image(generated.image)
    labels = {}
    if labeler is not None:
        label = label_image(labeler, generated.image, generated.native_size)
        labels[labeler.name] = (label.label_class, list(label.tags))
        # A plugin's own Label-like class may carry no numbers.
        values.update({name: float(value) for name, value in getattr(label, "measures", {}).items()})
    settings = request_to_dict(job.request)
    image_id = catalog.record_image(
        job.job_id,
        final,
        sha256_file(final),
        generated.infotext,
        settings=settings,
        seed=generated.seed,
        width=generated.image.width,
        height=generated.image.height,
        model_hash=generated.model_hash,
        timings=generated.timings,
        measures=values,
        labels=labels,
    )
    if fault:
        fault("recorded", job.job_id)
    return image_id


def run_study(
    study: Study,
    options: RunOptions | None = None,
    plugins: Plugins | None = None,
    *,
    fault: Fault | None = None,
) -> RunReport:
    """Generate every pending job of ``study`` into its catalog; see the module docstring.

    ``options`` default to the study's ``[run]`` table (callers apply their flags with
    ``study.run.override(...)``); ``plugins`` (labelers, named models) to the installed ones.
    ``fault`` is a test hook.
    """
    options = study.run if options is None else options
    plugins = installed_plugins() if plugins is None else plugins
    started = time.perf_counter()
    jobs = study.expand()
    scheme = label_scheme(study, plugins)
    labeler = None if scheme.labeler is None else plugins.labeler(scheme.labeler)
    path = options.catalog if options.catalog is not None else default_catalog_path(study)
    by_id = {job.job_id: job for job in jobs}
    with Catalog.open(path) as catalog:
        catalog.register_study(study.name, study.toml_text)
        catalog.register_jobs(jobs)
        pending = [by_id[r.job_id] for r in catalog.pending_jobs() if r.job_id in by_id]
        skipped = len(jobs) - len(pending)
        if options.max_jobs is not None:
            pending = pending[: max(0, options.max_jobs)]
        batches = plan_batches(pending, options.batch_size)
        report = RunReport(path, len(jobs), skipped, 0, 0, 0.0)
        if not batches:
            report.seconds = time.perf_counter() - started
            return report
        files = model_files(study, [b.model for b in batches], plugins)
        executor: Executor
        if options.executor == "ray":
            executor = RayExecutor(files, address=options.address, threads=options.threads)
        else:
            executor = LocalExecutor(files, threads=options.threads)
        bar = None
        if options.progress:
            bar = tqdm(total=len(pending), unit="img", desc=study.name, dynamic_ncols=True)
        sampling_started = time.perf_counter()
        # The model hash each model reference already has images of: a resumed study must not mix
        # pictures of two different files that went by the same name (a retrained or replaced model).
        recorded: dict[ModelRef, str] = {}
        for row in catalog.images():
            done = by_id.get(row["job_id"])
            if done is not None and row["model_hash"]:
                recorded.setdefault(done.model, row["model_hash"])
        try:
            for result in executor.run(batches):
                batch = result.batch
                if result.error is not None:
                    _fail(catalog, report, batch.jobs, result.error)
                else:
                    _check_same_model(recorded, batch, result.generated, path)
                    for job, generated in zip(batch.jobs, result.generated, strict=True):
                        try:
                            store(catalog, generated, job, labeler=labeler, fault=fault)
                        except VoidpromptError as error:
                            _fail(catalog, report, (job,), str(error))
                        else:
                            report.generated += 1
                    report.batches += 1
                if bar is not None:
                    # tqdm's ETA comes from its smoothed rate; images/min is the postfix.
                    bar.update(len(batch.jobs))
                    elapsed = time.perf_counter() - sampling_started
                    bar.set_postfix_str(f"{60.0 * report.generated / elapsed:.1f} img/min")
        finally:
            if bar is not None:
                bar.close()
            executor.close()
        report.seconds = time.perf_counter() - started
        return report


def _fail(catalog: Catalog, report: RunReport, jobs: Sequence[Job], reason: str) -> None:
    for job in jobs:
        catalog.mark_failed(job.job_id)
        report.failed[job.job_id] = reason
    log.warning("%d job(s) failed: %s", len(jobs), reason)


def _check_same_model(
    recorded: dict[ModelRef, str], batch: Batch, results: Sequence[Generated], catalog_path: Path
) -> None:
    """Refuse (before anything of the batch is written) a batch made with another file than the
    catalog's earlier images of the same model reference."""
    for generated in results:
        if not generated.model_hash:
            continue
        earlier = recorded.setdefault(batch.model, generated.model_hash)
        if earlier != generated.model_hash:
            raise StudyError(
                f"{catalog_path}: its images of model {batch.model.checkpoint!r} were made by a file with "
                f"hash {earlier}, but that model now has hash {generated.model_hash} (retrained or "
                "replaced); resuming would mix two models in one study. Start a new catalog (--catalog "
                "NEW.sqlite, or delete the old catalog and its images) or restore the original file."
            )

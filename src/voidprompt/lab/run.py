"""Run a study: pending jobs -> same-shape batches -> images on disk -> catalog rows.

Per image, in this order (the catalog's resumable protocol): generate, write to a temporary name,
rename into place, then commit one transaction holding its row, its measures and its pre-label.
A rerun skips every committed job; killing the process at any moment loses at most the batches in
flight (its renamed-but-uncommitted files are swept by the next ``Catalog.open``).

Overlap: the main thread only samples; a writer thread (:class:`CatalogWriter`, the catalog's one
writer) encodes, hashes, measures, labels and commits each batch while the next one samples. At
most :data:`WRITER_QUEUE` sampled batches wait for it, so the batches in flight are those, the one
being written and the one being sampled: a kill loses at most these, and duplicates nothing.

Batching: jobs that differ only in their seeds share one sampler run (one UNet call per step for
the whole batch), each image with its own seed. A1111 gives image ``i`` of a batch the seed
``seed + i``; a study's seeds are arbitrary (``"8 random"``), so
:func:`voidprompt.lab.execution.generate_batch` passes the seed list itself. Prompts are encoded
once each by the Engine's ``PromptEncoder`` cache and never together with another prompt (A1111's
mean restoration spans the encoded batch).

Explanations: the jobs a study's ``[explain]`` selects (:meth:`voidprompt.lab.study.Study.captures`)
run in batches of their own with the Engine's capture on; each image's explanation file is written
(temp, rename) before its PNG, and its row names it, so a row never points at a missing file.
Capture happens when a job is generated: a job already done without it stays as it is, and the run
report says how many selected jobs lack one (a new catalog captures them).

A full disk stops the run with :class:`voidprompt.lab.catalog.DiskFullError` ("disk full at
PATH; free space and run again to resume"): what was committed stays, and the rerun makes the rest.

Failures: a batch the Engine rejects fails as a whole, as one A1111 generation does (a batch that
runs out of GPU memory is halved and retried instead, see :mod:`voidprompt.lab.execution`): its
jobs are marked failed in the catalog and the study goes on; so does a job
whose picture cannot be saved, measured or labelled (a ``VoidpromptError``). The run report and
``study ls`` count them, and a rerun retries them. Every model file is checked before the first
batch, as A1111's X/Y/Z plot checks its checkpoints before generating.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import PngImagePlugin
from tqdm import tqdm

from voidprompt.errors import StudyError, VoidpromptError
from voidprompt.explain.measures import guidance_differences, tag_measures
from voidprompt.explain.record import ExplainOptions
from voidprompt.explain.store import DEFAULT_MAP_SIDE, explanation_path, load_explanation, save_explanation
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import (
    GUIDANCE_MEASURE,
    Catalog,
    Provenance,
    default_catalog_path,
    disk_full_stops,
    sha256_file,
)
from voidprompt.lab.execution import Batch, BatchResult, Executor, Generated, LocalExecutor, Placement
from voidprompt.lab.labels import Labeler, label_image, label_scheme
from voidprompt.lab.measures import measure_image
from voidprompt.lab.plugins import ModelFiles, Plugins, installed_plugins
from voidprompt.lab.process_executor import ProcessExecutor, local_workers
from voidprompt.lab.ray_executor import RayExecutor
from voidprompt.lab.schema import ModelRef, RunOptions, StudyFile
from voidprompt.lab.study import Job, Study, request_to_dict
from voidprompt.request import GenerationRequest

log = logging.getLogger(__name__)

# Sampled batches that may wait for the writer: enough to keep sampling going through a slow
# write, few enough that a kill loses little.
WRITER_QUEUE = 2


@dataclass
class RunReport:
    catalog_path: Path
    total: int  # jobs in the study
    skipped: int  # already done before this run
    generated: int
    batches: int
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)  # job id -> why, for this run's failures
    # Jobs [explain] selects that were done before without capture (they keep their pictures).
    uncaptured: int = 0

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.generated / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        text = (
            f"{self.generated} images in {self.batches} batches, {self.seconds:.1f} s "
            f"({self.images_per_minute:.1f} images/min); {self.skipped} were already done; "
            f"{len(self.failed)} failed; catalog {self.catalog_path}"
        )
        if self.uncaptured:
            text += (
                f"\n{self.uncaptured} job(s) selected by [explain] were generated before without capture; "
                "capture happens when a job is generated, so run the study into a new catalog "
                "(--catalog NEW.sqlite) to capture them"
            )
        if self.failed:
            job, reason = next(iter(self.failed.items()))
            text += f"\nfirst failure (job {job}): {reason}\nrun the study again to retry the failed jobs"
        return text


# ------------------------------------------------------------------------------------- planning


def batch_key(job: Job) -> tuple[ModelRef, GenerationRequest]:
    """What must be equal for two jobs to share a sampler run: the model and all but the seeds."""
    return job.model, job.request.replace(seed=0, subseed=0, extra_generation_params={})


def plan_batches(
    jobs: Sequence[Job],
    batch_size: int,
    *,
    explain: ExplainOptions | None = None,
    captures: Collection[str] = frozenset(),
) -> list[Batch]:
    """Group jobs by :func:`batch_key` (in order of first appearance) and cut groups to ``batch_size``.

    The jobs in ``captures`` form groups of their own, whose batches capture ``explain``: the
    Engine's capture is on or off for a whole sampler run."""
    if batch_size < 1:
        raise StudyError(f"batch_size={batch_size}: must be at least 1")
    if captures and explain is None:
        raise StudyError("jobs to capture were named without the explain options to capture them with")
    groups: dict[tuple[ModelRef, GenerationRequest, bool], list[Job]] = {}
    for job in jobs:
        groups.setdefault((*batch_key(job), job.job_id in captures), []).append(job)
    batches = []
    for (_, _, capture), members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = tuple(members[start : start + batch_size])
            batches.append(Batch(chunk[0].model, chunk[0].request, chunk, explain if capture else None))
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

# (stage, job_id): tests raise (or kill the process) here to simulate a crash. The writer's stages
# are before_write, temp_written, renamed and recorded; "sampled" is the main thread's, when a
# batch comes back from the executor (the writer may be busy with an earlier one).
Fault = Callable[[str, str], None]


def store(
    catalog: Catalog,
    generated: Generated,
    job: Job,
    *,
    labeler: Labeler | None = None,
    fault: Fault | None = None,
    run_id: int | None = None,
    map_side: int = DEFAULT_MAP_SIDE,
) -> int:
    """Write one image by the resumable protocol and commit it with its measures and pre-label;
    an image with an explanation has it written first (``map_side``: its maps' stored cells)."""
    final = catalog.images_dir / f"{job.job_id}.png"
    if fault:
        fault("before_write", job.job_id)
    explained = None
    if generated.explanation is not None:
        explained = save_explanation(explanation_path(final), generated.explanation, map_side=map_side)
        if fault:
            fault("explanation_written", job.job_id)

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
    per_tag = []
    if explained is not None:
        # Measured on the maps as the file keeps them, so anyone can recompute the catalog's numbers
        # from the file alone.
        stored = load_explanation(explained)
        per_tag = tag_measures(stored)
        values.update({f"{GUIDANCE_MEASURE}_{w}": v for w, v in guidance_differences(stored).items()})
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
        batch_size=generated.batch_size,
        run_id=run_id,
        explanation=explained,
        tag_measures=per_tag,
    )
    if fault:
        fault("recorded", job.job_id)
    return image_id


_STOP = object()


class CatalogWriter:
    """The catalog's one writer, on a thread of its own: stores each :class:`BatchResult` handed
    to it (or marks its jobs failed), in order, while the caller samples the next batch.

    An error here (a crash, a bug) stops the writer; the caller's next :meth:`put` or
    :meth:`finish` raises it. Until :meth:`finish` or :meth:`stop`, only this thread touches the
    catalog.
    """

    def __init__(
        self,
        catalog: Catalog,
        report: RunReport,
        *,
        executor: str,
        labeler: Labeler | None = None,
        fault: Fault | None = None,
        progress: Callable[[int], None] | None = None,
        map_side: int = DEFAULT_MAP_SIDE,
    ) -> None:
        self.catalog = catalog
        self.map_side = map_side
        self.report = report
        self.executor = executor
        self.labeler = labeler
        self.fault = fault
        self.progress = progress
        self.error: BaseException | None = None
        self._queue: queue.Queue[object] = queue.Queue(maxsize=WRITER_QUEUE)
        self._runs: dict[Provenance, int] = {}
        self._thread = threading.Thread(target=self._loop, name="voidprompt-catalog-writer", daemon=True)
        self._thread.start()

    def put(self, result: BatchResult) -> None:
        """Hand a result over; waits while the queue is full, raises the writer's error."""
        while True:
            if self.error is not None:
                raise self.error
            if not self._thread.is_alive():
                raise StudyError("the catalog writer was stopped before the run ended")  # a caller's bug
            try:
                self._queue.put(result, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for everything handed over to be written; raises the writer's error."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread after what is queued (at once if it failed)."""
        while self._thread.is_alive():
            try:
                self._queue.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, BatchResult)
            try:
                self._write(item)
            except BaseException as error:  # handed to the caller, which stops the run
                self.error = error
                return

    def _run_id(self, provenance: Provenance | None) -> int | None:
        if provenance is None:
            return None
        if provenance not in self._runs:
            self._runs[provenance] = self.catalog.register_run(provenance, self.executor)
        return self._runs[provenance]

    def _write(self, result: BatchResult) -> None:
        batch, report = result.batch, self.report
        if result.error is not None:
            _fail(self.catalog, report, batch.jobs, result.error)
        else:
            for job, generated in zip(batch.jobs, result.generated, strict=True):
                try:
                    run_id = self._run_id(generated.provenance)
                    store(self.catalog, generated, job, labeler=self.labeler, fault=self.fault, run_id=run_id,
                          map_side=self.map_side)  # fmt: skip
                except VoidpromptError as error:
                    _fail(self.catalog, report, (job,), str(error))
                else:
                    report.generated += 1
            report.batches += 1
        if self.progress is not None:
            self.progress(len(batch.jobs))


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
    labeler = None if scheme.labeler is None else plugins.labeler(scheme.labeler, study.labels)
    placement = Placement.from_options(options)
    on_gpu, workers = False, 1
    if options.executor == "local":
        # A device, precision or worker count this machine cannot run is refused before the
        # catalog is touched.
        on_gpu = placement.resolve()[0].type == "cuda"
        workers = local_workers(options.workers, placement)
    path = options.catalog if options.catalog is not None else default_catalog_path(study)
    by_id = {job.job_id: job for job in jobs}
    # A full disk ends the run with one clear error; what was committed stays, and a rerun resumes.
    with disk_full_stops(path.absolute()), Catalog.open(path) as catalog:
        catalog.register_study(study.name, study.toml_text)
        catalog.register_jobs(jobs)
        pending = [by_id[r.job_id] for r in catalog.pending_jobs() if r.job_id in by_id]
        skipped = len(jobs) - len(pending)
        if options.max_jobs is not None:
            pending = pending[: max(0, options.max_jobs)]
        report = RunReport(path, len(jobs), skipped, 0, 0, 0.0)
        captures = study.captures(jobs)
        if captures:
            report.uncaptured = sum(
                1 for row in catalog.images() if row["job_id"] in captures and not row.get("explanation")
            )
            if report.uncaptured:
                log.warning(
                    "%d job(s) selected by [explain] were generated before without capture; run the "
                    "study into a new catalog to capture them",
                    report.uncaptured,
                )
        if not pending:
            report.seconds = time.perf_counter() - started
            return report
        files = model_files(study, [job.model for job in pending], plugins)
        executor: Executor
        if options.executor == "ray":
            ray_executor = RayExecutor(
                files,
                address=options.address,
                threads=options.threads,
                workers=options.workers if isinstance(options.workers, int) else None,
                gpus_per_worker=options.gpus_per_worker,
                placement=placement,
            )
            on_gpu, executor = ray_executor.on_gpu, ray_executor
        elif workers > 1:
            executor = ProcessExecutor(files, workers=workers, threads=options.threads, placement=placement)
        else:
            executor = LocalExecutor(files, threads=options.threads, placement=placement)
        explain = None if study.explain is None else study.explain.options()
        batches = plan_batches(pending, options.batch_cap(on_gpu), explain=explain, captures=captures)
        # The model hash each model reference already has images of: a resumed study must not mix
        # pictures of two different files that went by the same name (a retrained or replaced model).
        recorded: dict[ModelRef, str] = {}
        for row in catalog.images():
            done = by_id.get(row["job_id"])
            if done is not None and row["model_hash"]:
                recorded.setdefault(done.model, row["model_hash"])
        bar = None
        if options.progress:
            bar = tqdm(total=len(pending), unit="img", desc=study.name, dynamic_ncols=True)
        sampling_started = time.perf_counter()

        def progress(count: int) -> None:
            assert bar is not None
            # tqdm's ETA comes from its smoothed rate; images/min is the postfix.
            bar.update(count)
            elapsed = time.perf_counter() - sampling_started
            bar.set_postfix_str(f"{60.0 * report.generated / elapsed:.1f} img/min")

        writer = CatalogWriter(
            catalog,
            report,
            executor=options.executor,
            labeler=labeler,
            fault=fault,
            progress=progress if bar is not None else None,
            map_side=DEFAULT_MAP_SIDE if study.explain is None else study.explain.map_side,
        )
        try:
            for result in executor.run(batches):
                if fault:
                    fault("sampled", result.batch.jobs[0].job_id)
                if result.error is None:
                    _check_same_model(recorded, result.batch, result.generated, path)
                writer.put(result)
            writer.finish()
        finally:
            writer.stop()  # after an error here: what was handed over is still written
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

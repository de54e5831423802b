"""Run a study: pending jobs -> same-shape batches -> images on disk -> catalog rows.

Per image, in this order (the catalog's resumable protocol): generate, write to a temporary name,
rename into place, then commit one transaction holding its row, its measures and its pre-label.
A rerun skips every committed job; killing the process at any moment loses at most the batch in
flight (its renamed-but-uncommitted files are swept by the next ``Catalog.open``).

Batching: jobs that differ only in their seeds share one sampler run (one UNet call per step for
the whole batch), each image with its own seed. A1111 gives image ``i`` of a batch the seed
``seed + i``; a study's seeds are arbitrary (``"8 random"``), so :func:`generate_batch` passes the
seed list itself. Prompts are encoded once each by the Engine's ``PromptEncoder`` cache and never
together with another prompt (A1111's mean restoration spans the encoded batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from voidprompt.errors import StudyError
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import Catalog, sha256_file
from voidprompt.lab.labels import Labeler, label_image, label_scheme
from voidprompt.lab.measures import Measure, measure_image
from voidprompt.lab.study import Job, ModelRef, Study, request_to_dict
from voidprompt.request import GenerationRequest

EXECUTORS = ("local", "ray")
# Images per sampler run. 16 rather than 8: on the miniature model at 64x64 (1 thread) a batch of
# 16 costs about 23% less CPU per image than 8; beyond that the gain is small and a kill loses more.
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Batch:
    """Jobs sharing one model and every request field but the seeds: one sampler run."""

    model: ModelRef
    request: GenerationRequest  # the first job's request; seeds come from ``jobs``
    jobs: tuple[Job, ...]

    @property
    def seeds(self) -> list[int]:
        return [job.request.seed for job in self.jobs]

    @property
    def subseeds(self) -> list[int]:
        return [job.request.subseed for job in self.jobs]


@dataclass
class Generated:
    """One image back from an executor, not yet on disk."""

    job_id: str
    image: Image.Image
    infotext: str
    seed: int
    model_hash: str | None
    timings: dict[str, float]
    # The side the model was trained at (its voidprompt.arch metadata): a labeler that reads pictures
    # at the model's pixel scale (the detector) needs it.
    native_size: int | None = None


@dataclass
class RunReport:
    catalog_path: Path
    total: int  # jobs in the study
    skipped: int  # already done before this run
    generated: int
    batches: int
    seconds: float
    failed: list[str] = field(default_factory=list)

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.generated / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"{self.generated} images in {self.batches} batches, {self.seconds:.1f} s "
            f"({self.images_per_minute:.1f} images/min); {self.skipped} were already done; "
            f"{len(self.failed)} failed; catalog {self.catalog_path}"
        )


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


def run_options(study: Study) -> dict[str, int | None]:
    """A study's ``[run]`` table: ``batch_size`` (default :data:`DEFAULT_BATCH_SIZE`) and ``threads``
    (torch intra-op threads; default: torch's own choice). Command-line flags override both."""
    table = dict(study.run_options)
    unknown = set(table) - {"batch_size", "threads"}
    if unknown:
        raise StudyError(
            f"{study.path}: [run] {sorted(unknown)[0]}: unknown key; allowed: batch_size, threads"
        )
    result: dict[str, int | None] = {"batch_size": DEFAULT_BATCH_SIZE, "threads": None}
    for key in ("batch_size", "threads"):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise StudyError(f"{study.path}: [run] {key} = {value!r}: write a whole number of at least 1")
        result[key] = value
    return result


def default_catalog_path(study: Study) -> Path:
    """``<study folder>/runs/<study file stem>/catalog.sqlite`` (images in ``catalog-images``)."""
    return study.path.parent / "runs" / study.path.stem / "catalog.sqlite"


def resolve_model(model: ModelRef, base_dir: Path) -> tuple[Path, Path | None]:
    """The checkpoint and VAE files of ``model``; relative names are relative to the study file."""
    vae = None if model.vae is None else _relative_to(Path(model.vae), base_dir)
    if not model.is_miniature:
        checkpoint = _relative_to(Path(str(model.checkpoint)), base_dir)
        if not checkpoint.is_file():
            raise StudyError(
                f"[model] checkpoint = {model.checkpoint!r}: no file at {checkpoint}; give a path "
                "relative to the study file or an absolute one"
            )
        return checkpoint, vae
    try:
        from voidprompt.demo.miniature import miniature_model_path  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise StudyError(
            "[model]: this study uses the miniature model, which is not in this build yet "
            '(voidprompt.demo.miniature); set [model] checkpoint = "path/to/model.safetensors" '
            "to run it on another checkpoint meanwhile"
        ) from None
    path = Path(miniature_model_path())
    if not path.is_file():
        raise StudyError(
            f"[model]: the miniature model's weights are missing ({path}); train them with the command "
            "in its model card, or set [model] checkpoint to another file"
        )
    return path, vae


def _relative_to(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


# ----------------------------------------------------------------------------------- generation


def generate_batch(
    engine: Any,
    request: GenerationRequest,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    *,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[Image.Image], list[str], dict[str, float]]:
    """Generate ``len(seeds)`` images in one sampler run, image ``i`` with ``seeds[i]``.

    Returns (images, infotexts, timings).
    """
    result = engine.generate(
        request.replace(batch_size=len(seeds), n_iter=1, seed=int(seeds[0]), subseed=int(subseeds[0])),
        seeds=list(seeds),
        subseeds=list(subseeds),
        should_stop=should_stop,
    )
    return result.images, result.infotexts, result.timings


class LocalExecutor:
    """Runs batches in this process, one loaded model (and Engine) per checkpoint."""

    def __init__(self, base_dir: Path, threads: int | None = None) -> None:
        self.base_dir = base_dir
        self.threads = threads
        self._engines: dict[ModelRef, Any] = {}

    def engine(self, model: ModelRef) -> Any:
        if model not in self._engines:
            from voidprompt.models.load import load_model
            from voidprompt.pipeline.engine import Engine

            checkpoint, vae = resolve_model(model, self.base_dir)
            self._engines.clear()  # one model in memory at a time
            self._engines[model] = Engine(load_model(checkpoint, vae_path=vae))
        return self._engines[model]

    def run(self, batches: Sequence[Batch]) -> Iterator[tuple[Batch, list[Generated]]]:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        for batch in batches:
            yield batch, run_batch(self.engine(batch.model), batch)


def run_batch(engine: Any, batch: Batch) -> list[Generated]:
    images, infotexts, timings = generate_batch(engine, batch.request, batch.seeds, batch.subseeds)
    n = len(batch.jobs)
    # Per-image share of the batch's time, plus the batch size so throughput can be recomputed.
    per_image = {k: v / n for k, v in timings.items()} | {"batch_size": float(n)}
    model_hash = engine.components.checkpoint.short_hash
    native = int(engine.components.arch.constants.vae_sample_size)
    return [
        Generated(job.job_id, image, info, job.request.seed, model_hash, dict(per_image), native)
        for job, image, info in zip(batch.jobs, images, infotexts, strict=True)
    ]


# ---------------------------------------------------------------------------------------- writer

Fault = Callable[[str, str], None]  # (stage, job_id): tests raise here to simulate a crash


def store(
    catalog: Catalog,
    generated: Generated,
    job: Job,
    *,
    measures: dict[str, Measure] | None = None,
    labeler: Labeler | None = None,
    fault: Fault | None = None,
) -> int:
    """Write one image by the resumable protocol and commit it with its measures and pre-label."""
    final = catalog.images_dir / f"{job.job_id}.png"
    if fault:
        fault("before_write", job.job_id)

    def write(temp: Path) -> None:
        # The infotext goes where A1111 puts it (the PNG "parameters" text chunk). Saved straight
        # to the sweepable temp name, not via imagemeta.save_png, whose own temporary file a
        # crash would leave under a name the catalog's sweep does not know.
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", generated.infotext)
        generated.image.save(temp, format="PNG", pnginfo=info)
        if fault:
            fault("temp_written", job.job_id)

    atomic_write(final, write)
    if fault:
        fault("renamed", job.job_id)
    values = measure_image(generated.image, registry=measures)
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
    *,
    catalog_path: str | Path | None = None,
    executor: str = "local",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    max_jobs: int | None = None,
    address: str | None = None,
    threads: int | None = None,
    labeler: Labeler | str | None = "auto",
    measures: dict[str, Measure] | None = None,
    fault: Fault | None = None,
) -> RunReport:
    """Generate every pending job of ``study`` into its catalog; see the module docstring.

    ``labeler="auto"`` uses the study's ``[labels]`` labeler (the detector on the miniature
    model); ``None`` disables pre-labeling. ``threads`` pins torch's intra-op threads (the Ray
    executor always pins: one per worker unless given). ``fault`` is a test hook.
    """
    if executor not in EXECUTORS:
        raise StudyError(f"executor={executor!r}: choose one of {', '.join(EXECUTORS)}")
    started = time.perf_counter()
    jobs = study.expand()
    scheme = label_scheme(study)
    chosen_labeler = scheme.make_labeler() if labeler == "auto" else labeler
    if isinstance(chosen_labeler, str):
        raise StudyError(f"labeler={chosen_labeler!r}: pass a Labeler, None or 'auto'")
    path = Path(catalog_path) if catalog_path is not None else default_catalog_path(study)
    by_id = {job.job_id: job for job in jobs}
    with Catalog.open(path) as catalog:
        catalog.register_study(study.name, study.toml_text)
        catalog.register_jobs(jobs)
        pending = [by_id[r.job_id] for r in catalog.pending_jobs() if r.job_id in by_id]
        skipped = len(jobs) - len(pending)
        if max_jobs is not None:
            pending = pending[: max(0, max_jobs)]
        batches = plan_batches(pending, batch_size)
        report = RunReport(path, len(jobs), skipped, 0, 0, 0.0)
        if not batches:
            report.seconds = time.perf_counter() - started
            return report
        runner: Any
        if executor == "ray":
            from voidprompt.lab.ray_executor import RayExecutor

            runner = RayExecutor(study.path.parent, address=address, threads=threads)
        else:
            runner = LocalExecutor(study.path.parent, threads=threads)
        bar = _progress_bar(len(pending), study.name) if progress else None
        sampling_started = time.perf_counter()
        # The model hash each model reference already has images of: a resumed study must not mix
        # pictures of two different files that went by the same name (a retrained or replaced model).
        recorded: dict[ModelRef, str] = {}
        for row in catalog.images():
            done = by_id.get(row["job_id"])
            if done is not None and row["model_hash"]:
                recorded.setdefault(done.model, row["model_hash"])
        try:
            for batch, results in runner.run(batches):
                _check_same_model(recorded, batch, results, path)
                for job, generated in zip(batch.jobs, results, strict=True):
                    store(catalog, generated, job, measures=measures, labeler=chosen_labeler, fault=fault)
                    report.generated += 1
                report.batches += 1
                if bar is not None:
                    bar.update(len(batch.jobs))
                    elapsed = time.perf_counter() - sampling_started
                    bar.set_postfix_str(f"{60.0 * report.generated / elapsed:.1f} img/min")
        finally:
            if bar is not None:
                bar.close()
            close = getattr(runner, "close", None)
            if close is not None:
                close()
        report.seconds = time.perf_counter() - started
        return report


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


def _progress_bar(total: int, name: str) -> Any:
    from tqdm import tqdm

    # tqdm's ETA comes from its smoothed rate; images/min is set as the postfix after each batch.
    return tqdm(total=total, unit="img", desc=name, dynamic_ncols=True)

"""What executors do: run same-shape batches of jobs and hand back images, or why a batch failed.

The runner (:mod:`voidprompt.lab.run`) plans :class:`Batch` es and writes what comes back; an
executor (:class:`LocalExecutor` here, :class:`voidprompt.lab.ray_executor.RayExecutor`) only
generates. A batch whose generation raises one of :data:`BATCH_ERRORS` comes back as a
:class:`BatchResult` with its ``error`` set, so the study goes on with the other batches and the
runner marks that batch's jobs failed; anything else (a bug, a kill) stops the run, which the
catalog's resumable protocol survives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from voidprompt.errors import VoidpromptError
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.schema import ModelRef
from voidprompt.lab.study import Job
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

# What one batch may raise without stopping the study: voidprompt's own errors (a request the
# Engine rejects, a model file that does not load) and a GPU out of memory, which A1111 also
# reports per generation - a rerun with a smaller batch size may then succeed.
BATCH_ERRORS: tuple[type[BaseException], ...] = (VoidpromptError, torch.cuda.OutOfMemoryError)


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
class BatchResult:
    """A batch's images (one per job, in order), or why it failed as a whole."""

    batch: Batch
    generated: list[Generated] = field(default_factory=list)
    error: str | None = None


class Executor(Protocol):
    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        """Yield one result per batch as each completes (any order)."""
        ...

    def close(self) -> None: ...


def describe(error: BaseException) -> str:
    """A failure as the catalog's run report shows it."""
    return str(error) if isinstance(error, VoidpromptError) else f"{type(error).__name__}: {error}"


def generate_batch(
    engine: Engine, request: GenerationRequest, seeds: Sequence[int], subseeds: Sequence[int]
) -> tuple[list[Image.Image], list[str], dict[str, float]]:
    """Generate ``len(seeds)`` images in one sampler run, image ``i`` with ``seeds[i]``.

    Returns (images, infotexts, timings).
    """
    result = engine.generate(
        request.replace(batch_size=len(seeds), n_iter=1, seed=int(seeds[0]), subseed=int(subseeds[0])),
        seeds=list(seeds),
        subseeds=list(subseeds),
    )
    return result.images, result.infotexts, result.timings


def run_batch(engine: Engine, batch: Batch) -> list[Generated]:
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


class LocalExecutor:
    """Runs batches in this process, one loaded model (and Engine) at a time."""

    def __init__(self, files: Mapping[ModelRef, ModelFiles], threads: int | None = None) -> None:
        self.files = files
        self.threads = threads
        self._engines: dict[ModelRef, Engine] = {}
        self._broken: dict[ModelRef, str] = {}  # a model that did not load fails its batches at once

    def engine(self, model: ModelRef) -> Engine:
        if model not in self._engines:
            files = self.files[model]
            self._engines.clear()  # one model in memory at a time
            self._engines[model] = Engine(load_model(files.checkpoint, vae_path=files.vae))
        return self._engines[model]

    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        for batch in batches:
            yield self._run_one(batch)

    def _run_one(self, batch: Batch) -> BatchResult:
        if batch.model in self._broken:
            return BatchResult(batch, error=self._broken[batch.model])
        try:
            engine = self.engine(batch.model)
        except BATCH_ERRORS as error:
            self._broken[batch.model] = describe(error)
            return BatchResult(batch, error=self._broken[batch.model])
        try:
            return BatchResult(batch, run_batch(engine, batch))
        except BATCH_ERRORS as error:
            return BatchResult(batch, error=describe(error))

    def close(self) -> None:
        self._engines.clear()

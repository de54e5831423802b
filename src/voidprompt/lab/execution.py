"""What executors do: run same-shape batches of jobs and hand back images, or why a batch failed.

The runner (:mod:`voidprompt.lab.run`) plans :class:`Batch` es and writes what comes back; an
executor (:class:`LocalExecutor` here, :class:`voidprompt.lab.ray_executor.RayExecutor`) only
generates. A batch whose generation raises one of :data:`BATCH_ERRORS` comes back as a
:class:`BatchResult` with its ``error`` set, so the study goes on with the other batches and the
runner marks that batch's jobs failed; anything else (a bug, a kill) stops the run, which the
catalog's resumable protocol survives.

Out of memory is not a failure: :func:`run_sized` halves the sampler run and tries again, so every
job of the batch still gets its image, and each image records the batch size it was made in (GPU
kernels pick algorithms per shape, so pixels can depend on it). On CUDA a :class:`BatchSizer`
also sizes runs from free memory; a deterministic run keeps its batch size fixed instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from PIL import Image

from voidprompt.allocator import keep_freed_memory
from voidprompt.errors import StudyError, VoidpromptError
from voidprompt.explain.record import ExplainOptions, Explanation
from voidprompt.lab.catalog import Provenance
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.schema import ModelRef, RunOptions
from voidprompt.lab.study import Job
from voidprompt.models.load import load_model
from voidprompt.models.placement import PrecisionPolicy, resolve_device, resolve_precision
from voidprompt.pipeline.engine import Engine
from voidprompt.pipeline.hires import hires_target
from voidprompt.request import GenerationRequest

log = logging.getLogger(__name__)

# What one batch may raise without stopping the study: voidprompt's own errors (a request the
# Engine rejects, a model file that does not load). A GPU out of memory is handled before this,
# by halving the batch (run_sized); it reaches here only as a StudyError when even one image does
# not fit or a deterministic run may not change its batch size.
BATCH_ERRORS: tuple[type[BaseException], ...] = (VoidpromptError,)
OUT_OF_MEMORY: type[BaseException] = torch.cuda.OutOfMemoryError
# cuBLAS picks reduction orders by workspace unless told a fixed workspace (NVIDIA's documented
# setting for reproducible results); it must be set before cuBLAS starts.
CUBLAS_WORKSPACE = ":4096:8"
# The share of free GPU memory a sampler run may plan to use (allocator fragmentation and the
# estimate's error take the rest).
MEMORY_SHARE = 0.85
# Executors with worker processes: batches sent ahead to each worker, so it never waits for the
# driver, and the workers one batch may take down (a batch that kills every worker it meets is not
# retried forever).
QUEUED_PER_WORKER = 2
MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class Batch:
    """Jobs sharing one model and every request field but the seeds: one sampler run."""

    model: ModelRef
    request: GenerationRequest  # the first job's request; seeds come from ``jobs``
    jobs: tuple[Job, ...]
    explain: ExplainOptions | None = None  # every job of the batch captures, or none does

    @property
    def seeds(self) -> list[int]:
        return [job.request.seed for job in self.jobs]

    @property
    def subseeds(self) -> list[int]:
        return [job.request.subseed for job in self.jobs]

    def part(self, start: int, stop: int | None = None) -> Batch:
        jobs = self.jobs[start:stop]
        return Batch(self.model, jobs[0].request, jobs, self.explain)


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
    batch_size: int = 1  # images in the sampler run that made it
    provenance: Provenance | None = None  # where and how it was computed
    explanation: Explanation | None = None  # with the batch's capture on


@dataclass
class BatchResult:
    """A batch's images (one per job, in order), or why it failed as a whole."""

    batch: Batch
    generated: list[Generated] = field(default_factory=list)
    error: str | None = None


class Executor(Protocol):
    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        """Yield results covering every batch's jobs as they complete (any order; an executor may
        split a batch into smaller sampler runs, each its own result)."""
        ...

    def close(self) -> None: ...


def batch_cost(batch: Batch) -> int:
    """Pixel-steps of a batch's sampler runs (its hires pass included): what its time grows with."""
    r = batch.request
    cost = r.width * r.height * r.steps
    if r.enable_hr:
        target = hires_target(r)
        cost += target.upscale_width * target.upscale_height * (r.hr_second_pass_steps or r.steps)
    return cost * len(batch.jobs)


def longest_first(batches: Sequence[Batch]) -> list[Batch]:
    """``batches``, the most expensive first (equal costs keep their order, so same-shape batches
    stay back to back): workers running in parallel then finish together, on cheap batches."""
    return sorted(batches, key=batch_cost, reverse=True)


def describe(error: BaseException) -> str:
    """A failure as the catalog's run report shows it."""
    return str(error) if isinstance(error, VoidpromptError) else f"{type(error).__name__}: {error}"


# -------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """Where and how executors run the model: the study's ``[run]`` choices, as names, so that a
    Ray worker resolves them on its own machine (``cuda`` there is the GPU Ray gave it)."""

    device: str | None = None  # None: the executor's default (cpu; cuda on a Ray cluster's GPUs)
    precision: str = "auto"
    compile: bool = False
    deterministic: bool = False
    disable_nan_check: bool = False  # A1111's --disable-nan-check, for the Engine
    channels_last: bool | None = None  # None: load_model's device default

    @classmethod
    def from_options(cls, options: RunOptions) -> Placement:
        o = options
        return cls(o.device, o.precision, o.compile, o.deterministic, o.disable_nan_check, o.channels_last)

    @property
    def device_name(self) -> str:
        return "cpu" if self.device is None else self.device

    def resolve(self) -> tuple[torch.device, PrecisionPolicy]:
        """The device and precision policy here; a DeviceError (one line) if this machine lacks them."""
        device = resolve_device(self.device_name)
        return device, resolve_precision(self.precision, device)


def provenance(device: torch.device, policy: PrecisionPolicy, placement: Placement) -> Provenance:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Provenance(
        device=str(device),
        precision=policy.name,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        gpu_name=gpu,
        compile=placement.compile,
        deterministic=placement.deterministic,
        channels_last=bool(placement.channels_last),
    )


@dataclass
class LoadedModel:
    engine: Engine
    provenance: Provenance


def load_engine(files: ModelFiles, placement: Placement) -> LoadedModel:
    """Load a model once where ``placement`` says, for every batch an executor runs on it."""
    device, policy = placement.resolve()
    components = load_model(
        files.checkpoint,
        vae_path=files.vae,
        device=device,
        precision=policy,
        channels_last=placement.channels_last,
    )
    # A compiled Engine keeps one graph per shape; the runner plans same-shape batches back to back.
    engine = Engine(components, compile=placement.compile, disable_nan_check=placement.disable_nan_check)
    return LoadedModel(engine, provenance(device, policy, placement))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, device: str) -> Iterator[None]:
    """torch's deterministic algorithms (and cuBLAS's fixed workspace on CUDA) while inside; the
    previous setting back afterwards, as the process may go on to other work."""
    if not enabled:
        yield
        return
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    # cuDNN's autotuner (A1111 turns it on for compute-capability 7.5 cards) may pick another
    # algorithm each run.
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


# ------------------------------------------------------------------------------- generation


def generate_batch(
    engine: Engine,
    request: GenerationRequest,
    seeds: Sequence[int],
    subseeds: Sequence[int],
    explain: ExplainOptions | None = None,
) -> tuple[list[Image.Image], list[str], dict[str, float], list[Explanation | None]]:
    """Generate ``len(seeds)`` images in one sampler run, image ``i`` with ``seeds[i]``; with
    ``explain``, each image's explanation too (the pictures are the same either way).

    Returns (images, infotexts, timings, explanations), explanations None without ``explain``.
    """
    result = engine.generate(
        request.replace(batch_size=len(seeds), n_iter=1, seed=int(seeds[0]), subseed=int(subseeds[0])),
        seeds=list(seeds),
        subseeds=list(subseeds),
        explain=explain,
    )
    explanations: list[Explanation | None] = [None] * len(result.images)
    if explain is not None:
        explanations = list(result.explanations)
    return result.images, result.infotexts, result.timings, explanations


def run_batch(engine: Engine, batch: Batch, provenance: Provenance | None = None) -> list[Generated]:
    """One sampler run for the whole batch."""
    images, infotexts, timings, explanations = generate_batch(
        engine, batch.request, batch.seeds, batch.subseeds, batch.explain
    )
    n = len(batch.jobs)
    # Per-image share of the batch's time, plus the batch size so throughput can be recomputed.
    per_image = {k: v / n for k, v in timings.items()} | {"batch_size": float(n)}
    model_hash = engine.components.checkpoint.short_hash
    native = int(engine.components.arch.constants.vae_sample_size)
    return [
        Generated(job.job_id, image, info, job.request.seed, model_hash, dict(per_image), native, n,
                  provenance, explanation)
        for job, image, info, explanation in zip(batch.jobs, images, infotexts, explanations, strict=True)
    ]  # fmt: skip


class MemoryProbe(Protocol):
    """What the sizer asks of a device's memory (CUDA's allocator; a stand-in in tests)."""

    def available(self) -> int:
        """Bytes a sampler run could still take: free on the device plus the allocator's idle cache."""
        ...

    def start(self) -> int:
        """Begin measuring a run's peak; returns the bytes allocated now."""
        ...

    def peak(self) -> int:
        """The most bytes allocated since :meth:`start`."""
        ...

    def release(self) -> None:
        """Hand cached blocks back after an out-of-memory error."""
        ...


class CudaMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def available(self) -> int:
        free, _total = torch.cuda.mem_get_info(self.device)
        idle = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + max(0, idle))

    def start(self) -> int:
        torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.device))

    def release(self) -> None:
        torch.cuda.empty_cache()


# What decides a sampler run's memory: the model, the picture's shape and the hires pass.
SizeKey = tuple[Any, ...]


def size_key(batch: Batch) -> SizeKey:
    r = batch.request
    hires = (r.hr_scale, r.hr_resize_x, r.hr_resize_y, r.hr_upscaler) if r.enable_hr else None
    return (batch.model, r.width, r.height, hires)


class BatchSizer:
    """How many images of a shape one sampler run takes.

    Without a memory probe (the CPU) a batch runs as planned. With one (CUDA), the first run of a
    shape takes one image and measures its peak memory; later runs take as many as
    :data:`MEMORY_SHARE` of the available memory holds at the last measured cost per image (each
    run refines it). An out-of-memory error halves the run and caps that shape there from then on;
    ``fixed`` (a deterministic run) allows neither, so batches keep the size they were planned at.
    """

    def __init__(self, memory: MemoryProbe | None = None, *, fixed: bool = False) -> None:
        self.memory = None if fixed else memory
        self.fixed = fixed
        self._cap: dict[SizeKey, int] = {}  # after an out-of-memory error: the most that may run
        self._per_image: dict[SizeKey, float] = {}  # measured peak bytes per image

    def size(self, key: SizeKey, wanted: int) -> int:
        n = min(wanted, self._cap.get(key, wanted))
        if self.memory is not None:
            per_image = self._per_image.get(key)
            fits = 1 if per_image is None else int(MEMORY_SHARE * self.memory.available() / per_image)
            n = min(n, fits)
        return max(1, n)

    @contextlib.contextmanager
    def measure(self, key: SizeKey, n: int) -> Iterator[None]:
        if self.memory is None:
            yield
            return
        before = self.memory.start()
        yield
        self._per_image[key] = max(1.0, (self.memory.peak() - before) / n)

    def out_of_memory(self, key: SizeKey, n: int, what: str) -> None:
        """Record that ``n`` images did not fit; raises StudyError when the run cannot shrink."""
        if self.fixed:
            raise StudyError(
                f"{what}: out of GPU memory at batch size {n}; a deterministic run keeps its batch size, "
                "so lower [run] batch_size (or --batch-size)"
            )
        if n == 1:
            raise StudyError(
                f"{what}: out of GPU memory for a single image; use a smaller size, --precision fp16, "
                "or a GPU with more free memory"
            )
        self._cap[key] = n // 2
        log.warning("%s: out of memory at batch size %d; retrying at %d", what, n, n // 2)
        if self.memory is not None:
            self.memory.release()


def run_sized(
    engine: Engine,
    batch: Batch,
    sizer: BatchSizer,
    provenance: Provenance | None = None,
) -> Iterator[BatchResult]:
    """Run ``batch`` in sampler runs the sizer fits, yielding each run's images as it completes.

    A run that raises one of :data:`BATCH_ERRORS` fails the jobs not yet made and ends the batch.
    """
    key = size_key(batch)
    what = f"{batch.request.width}x{batch.request.height}"
    done = 0
    while done < len(batch.jobs):
        n = sizer.size(key, len(batch.jobs) - done)
        part = batch.part(done, done + n)
        out_of_memory = False
        try:
            with sizer.measure(key, n):
                generated = run_batch(engine, part, provenance)
        except OUT_OF_MEMORY:
            # Retried outside the handler: the error's traceback holds the failed run's tensors.
            out_of_memory = True
        except BATCH_ERRORS as error:
            yield BatchResult(batch.part(done), error=describe(error))
            return
        if out_of_memory:
            try:
                sizer.out_of_memory(key, n, what)
            except StudyError as error:
                yield BatchResult(batch.part(done), error=describe(error))
                return
            continue
        yield BatchResult(part, generated)
        done += n


def memory_probe(device: torch.device) -> MemoryProbe | None:
    return CudaMemory(device) if device.type == "cuda" else None


class LocalExecutor:
    """Runs batches in this process, one loaded model (and Engine) at a time."""

    def __init__(
        self,
        files: Mapping[ModelRef, ModelFiles],
        threads: int | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.files = files
        self.threads = threads
        self.placement = placement or Placement()
        self._loaded: dict[ModelRef, LoadedModel] = {}
        self._broken: dict[ModelRef, str] = {}  # a model that did not load fails its batches at once
        self._sizer: BatchSizer | None = None
        if self.placement.device_name == "cpu":
            # Sampling on the CPU re-allocates the same activations every step; see voidprompt.allocator.
            keep_freed_memory()

    def loaded(self, model: ModelRef) -> LoadedModel:
        if model not in self._loaded:
            self._loaded.clear()  # one model in memory at a time
            self._loaded[model] = load_engine(self.files[model], self.placement)
        return self._loaded[model]

    def engine(self, model: ModelRef) -> Engine:
        return self.loaded(model).engine

    def sizer(self, device: torch.device) -> BatchSizer:
        if self._sizer is None:
            self._sizer = BatchSizer(memory_probe(device), fixed=self.placement.deterministic)
        return self._sizer

    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        with deterministic_algorithms(self.placement.deterministic, self.placement.device_name):
            for batch in batches:
                yield from self._run_one(batch)

    def _run_one(self, batch: Batch) -> Iterator[BatchResult]:
        if batch.model in self._broken:
            yield BatchResult(batch, error=self._broken[batch.model])
            return
        try:
            loaded = self.loaded(batch.model)
        except BATCH_ERRORS as error:
            self._broken[batch.model] = describe(error)
            yield BatchResult(batch, error=self._broken[batch.model])
            return
        sizer = self.sizer(loaded.engine.device)
        yield from run_sized(loaded.engine, batch, sizer, loaded.provenance)

    def close(self) -> None:
        self._loaded.clear()

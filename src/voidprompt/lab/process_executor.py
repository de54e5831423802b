"""The worker-process executor: ``[run] workers = N`` (N > 1) on one machine's CPU.

Each worker is a process of its own (started with ``spawn``, so nothing of the driver's torch state
is shared) that pins torch to ``threads`` intra-op threads (default 1) and runs batches with a
:class:`~voidprompt.lab.execution.LocalExecutor`, loading each model once. Images flow back to the
driver, the catalog's one writer, as each batch completes.

Why processes and not threads: the small convolutions and attention of a sampler step spread badly
over cores (on the miniature model two threads run a UNet step 1.65x faster than one, two processes
2x), and one thread per process keeps float summation order fixed, so the pictures are bit for bit
those of a single-process run with ``threads = 1``.

Scheduling: the most expensive batches go first (:func:`~voidprompt.lab.execution.longest_first`),
so the last batch to finish is a cheap one and no worker idles long at the end. A worker that dies
(killed, or ended by the out-of-memory killer) takes the pool down with it: the batches in flight go
back to the queue for a fresh pool, nothing of them having been written; a batch in flight through
:data:`~voidprompt.lab.execution.MAX_ATTEMPTS` lost pools fails instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from voidprompt.errors import StudyError
from voidprompt.lab.execution import (
    MAX_ATTEMPTS,
    QUEUED_PER_WORKER,
    Batch,
    BatchResult,
    LocalExecutor,
    Placement,
    longest_first,
)
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.schema import WORKERS_AUTO, ModelRef

log = logging.getLogger(__name__)

# The executor each worker process runs its batches with (set by _start_worker).
_worker: LocalExecutor | None = None


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def local_workers(workers: int | str | None, placement: Placement) -> int:
    """How many worker processes ``[run] workers`` means on this machine; 1 runs in this process.

    ``auto`` is one per CPU core on the CPU and 1 on a GPU. More than one on a GPU is refused: the
    batch sizer plans from the device's free memory, which processes sharing it would each count
    as their own.
    """
    if workers is None:
        return 1
    on_cpu = placement.device_name == "cpu"
    if workers == WORKERS_AUTO:
        return cpu_cores() if on_cpu else 1
    assert isinstance(workers, int)
    if workers > 1 and not on_cpu:
        raise StudyError(
            f"workers = {workers} on {placement.device_name}: worker processes run on the CPU; one "
            "process drives a GPU (for several GPUs use --executor ray)"
        )
    return workers


def _start_worker(files: Mapping[ModelRef, ModelFiles], threads: int, placement: Placement) -> None:
    global _worker
    # Ctrl-C is the driver's to handle: it ends the workers itself (close), so they print nothing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker = LocalExecutor(files, threads=threads, placement=placement)


def _run_batch(batch: Batch) -> list[BatchResult]:
    assert _worker is not None, "a worker process runs batches only after _start_worker"
    return list(_worker.run([batch]))


class ProcessExecutor:
    """Runs batches in ``workers`` processes of ``threads`` torch threads each (default 1)."""

    def __init__(
        self,
        files: Mapping[ModelRef, ModelFiles],
        *,
        workers: int,
        threads: int | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.files = {model: f.absolute() for model, f in files.items()}
        self.workers = workers
        self.threads = threads or 1
        self.placement = placement or Placement()
        self.lost = 0  # pools lost to a dead worker and started again
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight: dict[Future[list[BatchResult]], Batch] = {}

    def _start(self, workers: int) -> ProcessPoolExecutor:
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.files, self.threads, self.placement),
        )
        return self._pool

    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        queue = longest_first(batches)
        attempts: dict[int, int] = {}  # id(batch) -> pools lost while it was in flight
        workers = min(self.workers, len(queue)) or 1
        in_flight = self._in_flight  # what close() finds here was abandoned by the caller
        while queue or in_flight:
            while queue and len(in_flight) < workers * QUEUED_PER_WORKER:
                pool = self._pool or self._start(workers)
                batch = queue.pop(0)
                in_flight[pool.submit(_run_batch, batch)] = batch
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            orphans: list[Batch] = []
            for future in done:
                batch = in_flight.pop(future)
                try:
                    results = future.result()
                except BrokenProcessPool:
                    orphans.append(batch)
                    continue
                yield from results
            if not orphans:
                continue
            # Every batch still in flight died with the pool: all go back to the queue.
            orphans += list(in_flight.values())
            in_flight.clear()
            self.close()
            self.lost += 1
            log.warning("a worker process died; starting the workers again for %d batch(es)", len(orphans))
            retry = []
            for batch in longest_first(orphans):
                attempts[id(batch)] = attempts.get(id(batch), 0) + 1
                if attempts[id(batch)] >= MAX_ATTEMPTS:
                    yield BatchResult(batch, error=f"{MAX_ATTEMPTS} worker processes died running this batch")
                else:
                    retry.append(batch)
            queue[:0] = retry

    def close(self) -> None:
        """Shut the workers down; batches still in flight (the caller stopped early: an error, a
        Ctrl-C) are abandoned at once, their workers ended rather than waited for."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if self._in_flight:
            self._in_flight.clear()
            # ProcessPoolExecutor has no public way to end busy workers before Python 3.14.
            processes = getattr(pool, "_processes", None) or {}
            for process in list(processes.values()):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)

"""One worker thread runs every job that touches the model, in arrival order.

A1111 serialises generation (and model loading) with a single ``queue_lock``; here a FIFO queue
feeds one worker thread, so the event loop never blocks on torch, waiting requests do not each
hold a thread-pool thread, and the queue length is known (and bounded: a full queue answers 503
instead of piling up work). The progress state mirrors A1111's ``shared.state`` fields, which
``/sdapi/v1/progress`` reports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFullError(Exception):
    """More jobs are waiting than the configured maximum."""


@dataclass
class State:
    """A1111's ``shared.state`` subset: what the current job is doing."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    job_timestamp: str = "0"
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    started: float = 0.0
    textinfo: str | None = None
    latent: Any = None  # the latest latent (a CPU tensor), for the live preview
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, job: str, job_count: int) -> None:
        with self.lock:
            self.job = job
            self.job_count = job_count
            self.job_no = 0
            self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
            self.sampling_step = 0
            self.sampling_steps = 0
            self.interrupted = False
            self.skipped = False
            self.started = time.monotonic()
            self.textinfo = None
            self.latent = None

    def end(self) -> None:
        with self.lock:
            self.job = ""
            self.job_count = 0
            self.job_no = 0
            self.sampling_step = 0
            self.sampling_steps = 0
            self.latent = None
            self.textinfo = None

    def progress(self) -> tuple[float, float]:
        """(progress 0..1, eta_relative seconds) computed as A1111's progressapi does."""
        with self.lock:
            if self.job_count == 0:
                return 0.0, 0.0
            # A1111 starts at 0.01 so a just-started job is visibly "in progress".
            value = 0.01 + self.job_no / self.job_count
            if self.sampling_steps > 0:
                value += self.sampling_step / self.sampling_steps / self.job_count
            value = min(value, 1.0)
            elapsed = time.monotonic() - self.started
            return value, elapsed / value - elapsed


@dataclass
class _Job:
    name: str
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]


class GenerationQueue:
    """A FIFO of jobs run one at a time by a single daemon thread."""

    def __init__(self, max_queued: int = 64) -> None:
        self.max_queued = max_queued
        self.state = State()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="voidprompt-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished (the running one included)."""
        return self._pending

    def submit(self, name: str, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        with self._pending_lock:
            if self._pending >= self.max_queued:
                raise QueueFullError(
                    f"{self._pending} jobs are already queued (the limit is {self.max_queued}); retry later"
                )
            self._pending += 1
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Job(name, fn, future))
        return future

    async def run(self, name: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(name, fn))

    def interrupt(self) -> None:
        with self.state.lock:
            self.state.interrupted = True

    def skip(self) -> None:
        with self.state.lock:
            self.state.skipped = True

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn())
                    except BaseException as error:  # handed to the waiting request, never lost
                        job.future.set_exception(error)
            finally:
                with self._pending_lock:
                    self._pending -= 1

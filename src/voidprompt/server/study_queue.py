"""The server's queue of study runs: one study runs at a time (the device is one), the others wait.

Each item is a study of the studies folder and a state: ``queued`` (waiting its turn), ``running``,
``paused`` (stopped by a person; waits until resumed), ``done``, ``failed`` or ``cancelled``. A
scheduler thread starts the first queued item, in the queue's order, whenever no study run is
alive (a run started by ``POST /studies/{id}/run`` counts too), and notices when a run ends.

A run is :class:`voidprompt.server.studies.StudyRegistry`'s child process, so pausing and cancelling
are its stop (SIGINT; each finished image is already committed) and resuming is a new run of the
same study, which the lab's runner resumes from its catalog: only jobs without a picture run, so no
image is lost or made twice. The catalog is the truth for progress (its images, counted by job id).

The order and the states are kept in ``.voidprompt-queue.json`` in the studies folder, rewritten
atomically at every change, so a restarted server shows each study where it stopped; an item that
was running when the server stopped is queued again at its place and resumes when its turn comes.

Progress (images done of the study's jobs, images per minute since the run's first image, ETA)
is :meth:`StudyQueue.snapshot`; its ``version`` grows at every change, which is when the server-sent
events route sends it again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from voidprompt.errors import StudyError
from voidprompt.files import atomic_write_text
from voidprompt.lab.check import check_study
from voidprompt.lab.study import Study
from voidprompt.pipeline.hires import hires_target
from voidprompt.server.checkpoints import NotFoundError
from voidprompt.server.limits import LimitError, Limits
from voidprompt.server.studies import CatalogBusyError, StudyRegistry, image_count

log = logging.getLogger(__name__)

__all__ = ["QUEUE_FILE", "STATES", "StudyQueue"]

QUEUE_FILE = ".voidprompt-queue.json"
STATES = ("queued", "running", "paused", "done", "failed", "cancelled")
POLL_S = 0.5  # how often the scheduler looks at the running study's catalog and process


@dataclass
class QueueItem:
    study: str
    state: str
    total: int
    catalog: str
    added: str
    message: str = ""
    done: int = 0
    # This run's progress, in memory only: (time, images) when it started and at its first image.
    started: tuple[float, int] | None = field(default=None, repr=False)
    first_image: tuple[float, int] | None = field(default=None, repr=False)
    latest: float | None = field(default=None, repr=False)

    def saved(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "state": self.state,
            "total": self.total,
            "catalog": self.catalog,
            "added": self.added,
            "message": self.message,
        }

    def progress(self, now: float) -> dict[str, Any]:
        rate = eta = None
        if self.state == "running" and self.first_image is not None and self.latest is not None:
            t0, n0 = self.first_image
            elapsed = self.latest - t0
            if self.done > n0 and elapsed > 0:
                per_second = (self.done - n0) / elapsed
                rate = 60.0 * per_second
                eta = max(0, self.total - self.done) / per_second
        return {
            **self.saved(),
            "done": self.done,
            "images_per_minute": rate,
            "eta_seconds": eta,
        }


class StudyQueue:
    def __init__(self, registry: StudyRegistry, limits: Limits, *, poll_s: float = POLL_S) -> None:
        self.registry = registry
        self.limits = limits
        self.poll_s = poll_s
        self.path = registry.folder / QUEUE_FILE if registry.folder is not None else None
        self.items: list[QueueItem] = []
        self.version = 0
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        # Items being stopped by a person: their run's end is that person's, not a failure.
        self._stopping: set[str] = set()
        self._load()
        if any(item.state == "queued" for item in self.items):
            self._ensure_thread()

    # ---------------------------------------------------------------------------------- the file

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            rows = data["items"]
            items = [
                QueueItem(
                    study=str(r["study"]),
                    state=str(r["state"]),
                    total=int(r["total"]),
                    catalog=str(r["catalog"]),
                    added=str(r.get("added", "")),
                    message=str(r.get("message", "")),
                )
                for r in rows
            ]
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s: unreadable (%s); starting with an empty study queue", self.path, error)
            return
        for item in items:
            if item.state not in STATES:
                item.state, item.message = "paused", f"unknown state in {QUEUE_FILE}; resume to run it"
            elif item.state == "running":
                item.state, item.message = "queued", "the server restarted during its run; it resumes"
            item.done = image_count(Path(item.catalog))
        self.items = items

    def _save(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"version": 1, "items": [i.saved() for i in self.items]}, indent=1)
        atomic_write_text(self.path, text)

    def _changed_now(self, *, save: bool = True) -> None:
        """Under the lock: persist (for state changes) and wake the waiters."""
        if save:
            self._save()
        self.version += 1
        self._changed.notify_all()

    # ---------------------------------------------------------------------------------- reading

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            return {
                "version": self.version,
                "running": next((i.study for i in self.items if i.state == "running"), None),
                "items": [i.progress(now) for i in self.items],
            }

    @property
    def closed(self) -> bool:
        return self._closed

    def item(self, study_id: str) -> QueueItem:
        for item in self.items:
            if item.study == study_id:
                return item
        queued = ", ".join(i.study for i in self.items) or "(empty)"
        raise NotFoundError(f"study {study_id!r} is not in the queue (queue: {queued}); POST it to add it")

    # ---------------------------------------------------------------------------------- changing

    def add(self, study_id: str, *, paused: bool = False, position: int | None = None) -> QueueItem:
        """Queue a study: refused when its run would exceed this server's limits, when it fails
        ``study check``, or when another queued or running study writes the same catalog."""
        entry = self.registry.get(study_id)
        study = self.registry.study_of(entry)
        if entry.study_file is None:
            raise StudyError(f"study {study_id!r} has only a catalog; a run needs its study file (.toml)")
        total = self.check_limits(study)
        check_study(study)
        catalog = entry.catalog_path().resolve()
        with self._lock:
            for item in self.items:
                if item.study == study_id and item.state not in ("done", "cancelled", "failed"):
                    raise CatalogBusyError(f"study {study_id!r} is already in the queue ({item.state})")
            self._refuse_shared_catalog(study_id, catalog)
            self.items = [i for i in self.items if i.study != study_id]
            item = QueueItem(
                study=study_id,
                state="paused" if paused else "queued",
                total=total,
                catalog=str(catalog),
                added=datetime.now(UTC).isoformat(timespec="seconds"),
                done=image_count(catalog),
            )
            where = len(self.items) if position is None else max(0, min(position, len(self.items)))
            self.items.insert(where, item)
            self._changed_now()
        self._ensure_thread()
        return item

    def _refuse_shared_catalog(self, study_id: str, catalog: Path) -> None:
        for other in self.items:
            waiting = other.state in ("queued", "running", "paused")
            if other.study != study_id and waiting and Path(other.catalog) == catalog:
                raise CatalogBusyError(
                    f"study {study_id!r} writes the catalog {catalog}, which the queued study "
                    f"{other.study!r} writes too; two studies cannot write one catalog (cancel "
                    "one, or give the study file another name so it gets its own catalog)"
                )
        for run_id in list(self.registry.runs):
            # A run this queue is stopping (a pause) is on its way out; resuming waits for it.
            if run_id not in self._stopping and self.registry.is_running(run_id):
                running = self.registry.entries.get(run_id)
                if running is not None and running.catalog_path().resolve() == catalog:
                    raise CatalogBusyError(
                        f"the catalog {catalog} is being written by a run of study {run_id!r}; "
                        f"wait for it or stop it (POST /voidprompt/v1/studies/{run_id}/stop)"
                    )

    def check_limits(self, study: Study) -> int:
        """The study's job count, after checking its jobs against this server's limits."""
        jobs = study.expand()
        if len(jobs) > self.limits.max_study_jobs:
            raise LimitError(
                f"study {study.name!r} expands to {len(jobs)} jobs, over this server's limit of "
                f"{self.limits.max_study_jobs} per queued study; split it into several study files"
            )
        seen: set[tuple[Any, ...]] = set()
        for job in jobs:
            r = job.request
            key = (r.width, r.height, r.steps, r.enable_hr, r.hr_scale, r.hr_resize_x, r.hr_resize_y,
                   r.hr_second_pass_steps)  # fmt: skip
            if key in seen:
                continue
            seen.add(key)
            hr_pixels = 0
            if r.enable_hr:
                target = hires_target(r)
                hr_pixels = target.upscale_width * target.upscale_height
            try:
                self.limits.check_generation(
                    width=r.width,
                    height=r.height,
                    steps=r.steps + (r.hr_second_pass_steps if r.enable_hr else 0),
                    batch_size=1,
                    n_iter=1,
                    hr_pixels=hr_pixels,
                )
            except LimitError as error:
                axes = ", ".join(f"{k}={v}" for k, v in job.axis_values.items() if not k.endswith("_spec"))
                raise LimitError(
                    f"study {study.name!r} cannot be queued: its job {axes or job.job_id}: {error}",
                    error.status,
                ) from None
        return len(jobs)

    def pause(self, study_id: str) -> QueueItem:
        return self._stop(study_id, "paused", "pause", "paused; resume to run its missing images")

    def cancel(self, study_id: str) -> QueueItem:
        return self._stop(study_id, "cancelled", "cancel", "cancelled; its finished images are kept")

    def _stop(self, study_id: str, state: str, verb: str, message: str) -> QueueItem:
        with self._lock:
            item = self.item(study_id)
            if item.state in ("done", "cancelled", state):
                raise StudyError(f"study {study_id!r} is {item.state}; there is nothing to {verb}")
            was_running = item.state == "running"
            item.state, item.message = state, message
            if was_running:
                self._stopping.add(study_id)
            self._changed_now()
        if was_running:
            try:
                self.registry.stop_run(self.registry.get(study_id))
            finally:
                with self._lock:
                    self._stopping.discard(study_id)
                    item.done = image_count(Path(item.catalog))
                    item.started = item.first_image = item.latest = None
                    self._changed_now()
        return item

    def resume(self, study_id: str) -> QueueItem:
        """A paused, cancelled or failed study waits for its turn again, at its place. Its file is
        read again (it may have been edited since): checked and counted as when it was added."""
        self.item(study_id)
        study = self.registry.study_of(self.registry.get(study_id))
        total = self.check_limits(study)
        check_study(study)
        with self._lock:
            item = self.item(study_id)
            item.total = total
            if item.state in ("queued", "running"):
                raise StudyError(f"study {study_id!r} is already {item.state}")
            if item.state == "done" and item.done >= item.total:
                raise StudyError(f"study {study_id!r} is done: all {item.total} images are in its catalog")
            self._refuse_shared_catalog(study_id, Path(item.catalog))
            item.state, item.message = "queued", ""
            self._changed_now()
        self._ensure_thread()
        return item

    def remove(self, study_id: str) -> None:
        with self._lock:
            item = self.item(study_id)
            if item.state == "running":
                raise CatalogBusyError(f"study {study_id!r} is running; pause or cancel it first")
            self.items.remove(item)
            self._changed_now()

    def move(self, study_id: str, position: int) -> list[str]:
        """Put a study at ``position`` (0 is the front; beyond the end is the end)."""
        with self._lock:
            item = self.item(study_id)
            self.items.remove(item)
            self.items.insert(max(0, min(position, len(self.items))), item)
            self._changed_now()
            return [i.study for i in self.items]

    def close(self) -> None:
        """Stop the scheduler and the running study; the file still says it runs, so the next
        server resumes it."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()
            running = [i.study for i in self.items if i.state == "running"]
        if self._thread is not None:
            self._thread.join(10)
        for study_id in running:
            entry = self.registry.entries.get(study_id)
            if entry is not None:
                self.registry.stop_run(entry, timeout=5.0)

    # ---------------------------------------------------------------------------------- scheduler

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._loop, name="study-queue", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
            try:
                self.tick()
            except Exception:  # the scheduler must outlive one bad study
                log.exception("study queue")
            with self._lock:
                if self._closed:
                    return
                self._changed.wait(self.poll_s)

    def tick(self) -> None:
        """One look: the running study's progress and end, then the next study's start."""
        with self._lock:
            running = next((i for i in self.items if i.state == "running"), None)
        if running is not None:
            self._follow(running)
        with self._lock:
            if self._closed or any(i.state == "running" for i in self.items) or self._stopping:
                return
            if any(self.registry.is_running(run_id) for run_id in list(self.registry.runs)):
                return  # another run (started outside the queue) holds the device
            nxt = next((i for i in self.items if i.state == "queued"), None)
            if nxt is None:
                return
            try:
                entry = self.registry.get(nxt.study)
                self.registry.start_run(entry, max_jobs=None, batch_size=None)
            except (StudyError, NotFoundError) as error:
                nxt.state, nxt.message = "failed", str(error)
                self._changed_now()
                return
            now = time.monotonic()
            nxt.state, nxt.message = "running", ""
            nxt.done = image_count(Path(nxt.catalog))
            nxt.started, nxt.first_image, nxt.latest = (now, nxt.done), None, now
            self._changed_now()

    def _follow(self, item: QueueItem) -> None:
        done = image_count(Path(item.catalog))
        handle = self.registry.runs.get(item.study)
        code = None if handle is None else handle.process.poll()
        now = time.monotonic()
        with self._lock:
            if item.state != "running" or item.study in self._stopping:
                return
            changed = done != item.done
            if item.started is not None and item.first_image is None and done > item.started[1]:
                # The rate counts from the first image, after the model has loaded.
                item.first_image = (now, done)
            item.done = done
            if changed:
                item.latest = now
            if handle is None or code is not None:
                tail = "" if handle is None else (handle.log[-1] if handle.log else "")
                if code == 0:
                    item.state, item.message = "done", f"{done} of {item.total} images"
                else:
                    item.state = "failed"
                    item.message = f"the run ended with exit code {code}: {tail}".rstrip(": ")
                item.started = item.first_image = item.latest = None
                self._changed_now()
            elif changed:
                self._changed_now(save=False)

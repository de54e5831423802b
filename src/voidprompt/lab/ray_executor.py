"""The Ray executor: one worker per GPU (or per CPU slot), each loading the model once.

Workers only generate; images flow back to the driver, which is the catalog's one writer (the
resumable protocol and the single-writer lock stay as they are for the local executor).

Placement: on a cluster with GPUs each worker is an actor holding ``gpus_per_worker`` GPUs (default
1), so Ray starts one per GPU and gives each its own (``CUDA_VISIBLE_DEVICES``); the worker loads
its model once onto that GPU at the study's precision (``device`` defaults to ``cuda`` there).
Without GPUs each worker holds ``threads`` CPUs. Each worker pins torch to ``threads`` intra-op
threads (default 1): Ray sets thread counts per worker, and a different count changes float
summation order, so CPU results match a local run pinned the same way bit for bit.

A worker lost mid-batch (its process killed, its node gone) fails the batches it held with Ray's
actor error; the driver starts a replacement and queues those batches again. Nothing of them was
written, so nothing is duplicated; a batch that takes
:data:`~voidprompt.lab.execution.MAX_ATTEMPTS` workers down with it fails instead.

``address=None`` joins the Ray instance this process already started (``ray.init``) or starts a
local one with every CPU (and GPU); ``"auto"`` joins a running cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from voidprompt.errors import StudyError, require_extra
from voidprompt.lab.execution import (
    BATCH_ERRORS,
    MAX_ATTEMPTS,
    QUEUED_PER_WORKER,
    Batch,
    BatchResult,
    BatchSizer,
    LoadedModel,
    Placement,
    describe,
    deterministic_algorithms,
    load_engine,
    longest_first,
    memory_probe,
    run_sized,
)
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.schema import ModelRef

log = logging.getLogger(__name__)


class _Worker:
    """The actor body (wrapped with ``ray.remote`` when the executor starts)."""

    def __init__(self, files: ModelFiles, threads: int, placement: Placement) -> None:
        torch.set_num_threads(threads)
        self.placement = placement
        self.loaded: LoadedModel | None = None
        self.error: str | None = None
        # A worker process does nothing else: deterministic algorithms stay on for its lifetime.
        self._settings = contextlib.ExitStack()
        self._settings.enter_context(deterministic_algorithms(placement.deterministic, placement.device_name))
        try:
            self.loaded = load_engine(files, placement)
        except BATCH_ERRORS as error:  # every batch of this worker fails with the reason
            self.error = describe(error)
        self.sizer = BatchSizer(
            memory_probe(self.loaded.engine.device) if self.loaded else None, fixed=placement.deterministic
        )

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: its process, the GPUs Ray gave it, its device and precision."""
        import ray

        provenance = self.loaded.provenance if self.loaded else None
        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": provenance.device if provenance else None,
            "precision": provenance.precision if provenance else None,
            "gpu_name": provenance.gpu_name if provenance else None,
            "error": self.error,
        }

    def run(self, batch: Batch) -> list[BatchResult]:
        if self.loaded is None:
            return [BatchResult(batch, error=self.error)]
        return list(run_sized(self.loaded.engine, batch, self.sizer, self.loaded.provenance))


class RayExecutor:
    def __init__(
        self,
        files: Mapping[ModelRef, ModelFiles],
        *,
        address: str | None = None,
        threads: int | None = None,
        workers: int | None = None,
        gpus_per_worker: float | None = None,
        placement: Placement | None = None,
    ) -> None:
        ray = require_extra("ray", "ray", "--executor ray", instead="or use --executor local")
        self.ray = ray
        self.files = files
        self.threads = threads or 1
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        resources = ray.cluster_resources()
        cluster_gpus = float(resources.get("GPU", 0))
        self.gpus = (1.0 if cluster_gpus > 0 else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        if self.gpus > cluster_gpus:
            self.close()
            raise StudyError(
                f"--gpus-per-worker {self.gpus:g}: the Ray cluster has {cluster_gpus:g} GPUs; "
                "use fewer per worker, or 0 to run on CPUs"
            )
        placement = placement or Placement()
        if placement.device is None:
            placement = dataclasses.replace(placement, device="cuda" if self.gpus > 0 else "cpu")
        self.placement = placement
        cpus = int(ray.available_resources().get("CPU", 1))
        by_cpu = max(1, cpus // self.threads)
        by_gpu = max(1, int(cluster_gpus // self.gpus)) if self.gpus else by_cpu
        self.workers = workers or min(by_cpu, by_gpu)
        self.placed: list[dict[str, Any]] = []  # each started worker's describe(), for logs and tests
        self.lost = 0  # workers that died and were replaced

    @property
    def on_gpu(self) -> bool:
        return self.placement.device_name.startswith("cuda")

    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        ray = self.ray
        by_model: dict[ModelRef, list[Batch]] = {}
        for batch in batches:
            by_model.setdefault(batch.model, []).append(batch)
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_restarts=0)(_Worker)
        for model, work in by_model.items():
            files = self.files[model].absolute()

            def start(files: ModelFiles = files) -> Any:
                return remote.remote(files, self.threads, self.placement)

            actors = [start() for _ in range(min(self.workers, len(work)))]
            self._describe(actors)
            try:
                yield from self._schedule(actors, work, start)
            finally:
                for actor in actors:
                    ray.kill(actor)

    def _describe(self, actors: list[Any]) -> None:
        for index, info in enumerate(self.ray.get([actor.describe.remote() for actor in actors])):
            self.placed.append(info)
            log.info("ray worker %d: %s", index, info)

    def _schedule(self, actors: list[Any], work: list[Batch], start: Any) -> Iterator[BatchResult]:
        ray = self.ray
        # Keep every worker busy with a few batches queued each; results are written as they
        # complete, so a kill of the driver loses only the batches in flight.
        queue = longest_first(work)
        # ref -> (batch, the actor it was sent to), in the order sent: an actor runs its calls in
        # that order, so its oldest unfinished call is the one it was running.
        in_flight: dict[Any, tuple[Batch, Any]] = {}
        attempts: dict[int, int] = {}  # id(batch) -> workers lost while running it
        while queue or in_flight:
            for actor in actors:
                while queue and sum(a is actor for _, a in in_flight.values()) < QUEUED_PER_WORKER:
                    batch = queue.pop(0)
                    in_flight[actor.run.remote(batch)] = (batch, actor)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            # The actor's calls still unfinished, oldest first (this one among them).
            unfinished = [in_flight[r][0] for r in in_flight if in_flight[r][1] is in_flight[ref][1]]
            batch, actor = in_flight.pop(ref)
            try:
                results: list[BatchResult] = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                if actor in actors:  # the first of its calls to fail: replace it
                    actors[actors.index(actor)] = start()
                    self.lost += 1
                    log.warning("ray worker lost (%s); starting another", type(error).__name__)
                    # Only the batch it was running counts against that batch; the ones queued
                    # behind it go back to the queue as they were.
                    attempts[id(unfinished[0])] = attempts.get(id(unfinished[0]), 0) + 1
                if attempts.get(id(batch), 0) >= MAX_ATTEMPTS:
                    yield BatchResult(batch, error=f"{MAX_ATTEMPTS} Ray workers died running this batch")
                else:
                    queue.insert(0, batch)
                continue
            except BATCH_ERRORS as error:
                # Ray re-raises a worker's exception as a subclass of its own type; the worker's
                # own exception (``cause``) says why, without Ray's traceback text.
                yield BatchResult(batch, error=describe(getattr(error, "cause", None) or error))
                continue
            yield from results

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

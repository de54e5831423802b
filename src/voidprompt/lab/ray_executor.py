"""The Ray executor: one worker per CPU slot (or GPU), each loading the model once.

Workers only generate; images flow back to the driver, which is the catalog's one writer (the
resumable protocol and the single-writer lock stay as they are for the local executor). Each
worker pins torch to ``threads`` intra-op threads (default 1): Ray sets thread counts per
worker, and a different count changes float summation order, so results match a local run
pinned the same way bit for bit, and an unpinned local run within a small pixel tolerance.

``address=None`` joins the Ray instance this process already started (``ray.init``) or starts a
local one with every CPU; ``"auto"`` joins a running cluster.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from voidprompt.errors import StudyError
from voidprompt.lab.execution import BATCH_ERRORS, Batch, BatchResult, Generated, describe, run_batch
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.schema import ModelRef
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine


class _Worker:
    """The actor body (wrapped with ``ray.remote`` when the executor starts)."""

    def __init__(self, checkpoint: str, vae: str | None, threads: int) -> None:
        torch.set_num_threads(threads)
        self.engine = Engine(load_model(checkpoint, vae_path=vae))

    def run(self, batch: Batch) -> list[Generated]:
        return run_batch(self.engine, batch)


class RayExecutor:
    def __init__(
        self,
        files: Mapping[ModelRef, ModelFiles],
        *,
        address: str | None = None,
        threads: int | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise StudyError(
                "--executor ray needs the ray package (pip install ray); or use --executor local"
            ) from None
        self.ray = ray
        self.files = files
        self.threads = threads or 1
        self._started = False
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            self._started = True
        cpus = int(ray.available_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus // self.threads)
        self.gpus = gpus_per_worker

    def run(self, batches: Sequence[Batch]) -> Iterator[BatchResult]:
        ray = self.ray
        by_model: dict[ModelRef, list[Batch]] = {}
        for batch in batches:
            by_model.setdefault(batch.model, []).append(batch)
        remote = ray.remote(num_cpus=self.threads, num_gpus=self.gpus)(_Worker)
        for model, work in by_model.items():
            files = self.files[model]
            vae = None if files.vae is None else str(files.vae)
            actors = [
                remote.remote(str(files.checkpoint), vae, self.threads)
                for _ in range(min(self.workers, len(work)))
            ]
            try:
                # Keep every worker busy with at most two batches queued each; results are written
                # as they complete, so a kill loses only the batches in flight.
                queue = list(work)
                in_flight: dict[Any, Batch] = {}
                load = dict.fromkeys(range(len(actors)), 0)
                owner: dict[Any, int] = {}
                while queue or in_flight:
                    for index in list(load):
                        while queue and load[index] < 2:
                            batch = queue.pop(0)
                            ref = actors[index].run.remote(batch)
                            in_flight[ref], owner[ref] = batch, index
                            load[index] += 1
                    done, _ = ray.wait(list(in_flight), num_returns=1)
                    ref = done[0]
                    batch = in_flight.pop(ref)
                    load[owner.pop(ref)] -= 1
                    yield self._result(batch, ref)
            finally:
                for actor in actors:
                    ray.kill(actor)

    def _result(self, batch: Batch, ref: Any) -> BatchResult:
        try:
            # Ray re-raises a worker's exception as a subclass of its own type, so the same
            # errors fail a batch here as in the local executor.
            generated: list[Generated] = self.ray.get(ref)
        except BATCH_ERRORS as error:
            # The worker's own exception (``cause``) says why, without Ray's traceback text.
            return BatchResult(batch, error=describe(getattr(error, "cause", None) or error))
        return BatchResult(batch, generated)

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()

"""The worker-process executor: how many workers ``[run] workers`` means, its scheduling (with a
stand-in pool in this process: most expensive batch first, a dead worker's batches queued again,
a batch that keeps killing workers failing alone), and, in the slow suite, real worker processes
giving the pictures of a one-thread local run bit for bit, also when one of them is killed."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lab_helpers import EXPLAIN_FIRST_SEED, explanations, quiet, study_text

from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.execution import MAX_ATTEMPTS, Batch, BatchResult, LocalExecutor, Placement, longest_first
from voidprompt.lab.plugins import ModelFiles
from voidprompt.lab.process_executor import ProcessExecutor, cpu_cores, local_workers
from voidprompt.lab.run import plan_batches, run_study
from voidprompt.lab.study import parse_study


def test_workers_auto_is_one_per_core_on_the_cpu_and_one_on_a_gpu() -> None:
    cpu, gpu = Placement("cpu"), Placement("cuda")
    assert local_workers(None, cpu) == 1
    assert local_workers(3, cpu) == 3
    assert local_workers("auto", cpu) == cpu_cores() == len(os.sched_getaffinity(0))
    assert local_workers("auto", gpu) == local_workers(1, gpu) == 1
    refused = r"^workers = 2 on cuda: worker processes run on the CPU; .* --executor ray\)$"
    with pytest.raises(StudyError, match=refused):
        local_workers(2, gpu)


def _batches(tmp_path: Path, **kw: Any) -> list[Batch]:
    study = parse_study(study_text(tmp_path / "m.safetensors", **kw), tmp_path / "t.toml")
    return plan_batches(study.expand(), 2)


def test_the_most_expensive_batches_go_first(tmp_path: Path) -> None:
    # 16x16 and 32x16 sizes, two W values, 3 seeds at batch size 2: full batches of 2 and
    # single-seed remainders; cost = width * height * steps * images.
    batches = _batches(tmp_path, seeds="3 random")
    ordered = longest_first(batches)
    costs = [b.request.width * b.request.height * b.request.steps * len(b.jobs) for b in ordered]
    assert sorted(costs, reverse=True) == costs and len(set(costs)) == 3
    assert ordered[0].request.width == 32 and len(ordered[0].jobs) == 2
    # Equal costs keep the planned order.
    for cost in set(costs):
        same = [b for b in ordered if b.request.width * b.request.height * len(b.jobs) * 3 == cost]
        assert same == [b for b in batches if b in same]


class StandInPool:
    """A process pool in this process: each submitted batch finishes at once, or breaks the pool
    (as a dead worker does) when ``dies`` says so."""

    def __init__(self, dies: Callable[[Batch], bool], log: list[tuple[int, Batch]], number: int) -> None:
        self.dies, self.log, self.number = dies, log, number
        self.shut = False

    def submit(self, fn: Callable[[Batch], list[BatchResult]], batch: Batch) -> Future[list[BatchResult]]:
        assert not self.shut
        self.log.append((self.number, batch))
        future: Future[list[BatchResult]] = Future()
        if self.dies(batch):
            future.set_exception(BrokenProcessPool("a process in the pool was terminated abruptly"))
        else:
            future.set_result([BatchResult(batch)])
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self.shut = True


class StandInExecutor(ProcessExecutor):
    def __init__(self, dies: Callable[[Batch], bool]) -> None:
        super().__init__({}, workers=2)
        self.dies = dies
        self.pools: list[StandInPool] = []
        self.submitted: list[tuple[int, Batch]] = []

    def _start(self, workers: int) -> Any:
        assert workers == 2
        self.pools.append(StandInPool(self.dies, self.submitted, len(self.pools)))
        self._pool = self.pools[-1]  # type: ignore[assignment]
        return self._pool


def test_a_dead_workers_batches_run_again_once(tmp_path: Path) -> None:
    batches = _batches(tmp_path, seeds="4 random")
    victim = longest_first(batches)[1]
    died: list[Batch] = []

    def dies(batch: Batch) -> bool:
        if batch is victim and not died:
            died.append(batch)
            return True
        return False

    executor = StandInExecutor(dies)
    results = list(executor.run(batches))
    assert executor.lost == 1 and len(executor.pools) == 2 and executor.pools[0].shut
    assert all(r.error is None for r in results)
    assert sorted(id(r.batch) for r in results) == sorted(id(b) for b in batches)  # each exactly once
    # Four batches in flight at a time (two per worker); the victim goes to the fresh pool first.
    assert next(b for n, b in executor.submitted if n == 1) is victim


def test_a_batch_that_keeps_killing_workers_fails_alone(tmp_path: Path) -> None:
    batches = _batches(tmp_path, seeds="4 random")
    poison = batches[-1]
    executor = StandInExecutor(lambda batch: batch is poison)
    results = list(executor.run(batches))
    failed = [r for r in results if r.error is not None]
    assert [r.batch for r in failed] == [poison]
    assert failed[0].error == f"{MAX_ATTEMPTS} worker processes died running this batch"
    assert executor.lost == len(executor.pools) == MAX_ATTEMPTS
    assert sorted(id(r.batch) for r in results) == sorted(id(b) for b in batches)


# ------------------------------------------------------------------------- real worker processes


def _catalog(folder: Path) -> dict[str, tuple[str, str, dict[str, float]]]:
    with Catalog.open(folder / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        return {
            image["job_id"]: (image["sha256"], image["infotext"], catalog.measures(image["id"]))
            for image in catalog.images()
        }


@pytest.mark.slow  # two worker processes, each importing torch
def test_worker_processes_write_a_one_thread_runs_catalog_bit_for_bit(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    text = study_text(tiny_checkpoint, seeds="3 random")
    local = parse_study(text, tmp_path / "local" / "t.toml")
    processes = parse_study(text, tmp_path / "processes" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    report = run_study(processes, quiet(processes, batch_size=2, workers=2))
    assert (report.generated, report.batches, len(report.failed)) == (12, 8, 0)
    a, b = _catalog(tmp_path / "local"), _catalog(tmp_path / "processes")
    assert sorted(a) == sorted(b) == sorted(j.job_id for j in local.expand())
    assert a == b  # the PNG files' hashes, infotexts and measures


@pytest.mark.slow  # two worker processes, each importing torch
def test_explanations_travel_back_from_worker_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = study_text(tiny_checkpoint, seeds="3 random") + EXPLAIN_FIRST_SEED
    local = parse_study(text, tmp_path / "local" / "t.toml")
    processes = parse_study(text, tmp_path / "processes" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    report = run_study(processes, quiet(processes, batch_size=2, workers=2))
    assert (report.generated, len(report.failed)) == (12, 0)
    expected = explanations(tmp_path / "local")
    assert set(expected) == local.captures(local.expand()) and len(expected) == 2
    assert explanations(tmp_path / "processes") == expected
    assert _catalog(tmp_path / "processes") == _catalog(tmp_path / "local")


@pytest.mark.slow  # two worker processes, one of them killed
def test_a_killed_worker_process_loses_nothing_and_duplicates_nothing(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # Slow enough batches (20 steps, 32x32) that the other worker is busy when one is killed.
    text = study_text(tiny_checkpoint, sizes="32x32", seeds="4 random", steps=20)
    jobs = parse_study(text, tmp_path / "t.toml").expand()
    files = {jobs[0].model: ModelFiles(tiny_checkpoint, None)}
    batches = plan_batches(jobs, 2)
    assert len(batches) == 4
    local = LocalExecutor(files, threads=1)
    expected = {g.job_id: np.asarray(g.image) for r in local.run(batches) for g in r.generated}
    executor = ProcessExecutor(files, workers=2)
    got: dict[str, list[np.ndarray]] = {}
    try:
        for result in executor.run(batches):
            assert result.error is None
            if not got:  # the first batch is back; the workers hold the other three
                children = multiprocessing.active_children()
                assert len(children) == 2
                assert children[0].pid is not None
                os.kill(children[0].pid, signal.SIGKILL)
            for generated in result.generated:
                got.setdefault(generated.job_id, []).append(np.asarray(generated.image))
    finally:
        executor.close()
    assert executor.lost == 1
    assert sorted(got) == sorted(expected) and all(len(v) == 1 for v in got.values())
    for job_id, (pixels,) in got.items():
        assert np.array_equal(pixels, expected[job_id])


@pytest.mark.slow  # two worker processes, abandoned mid-run
def test_a_run_stopped_early_ends_its_workers_at_once(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The caller stops after the first batch (an error, a Ctrl-C): the workers still busy are
    ended, not waited for, and leave no process behind."""
    import time

    text = study_text(tiny_checkpoint, sizes="32x32", seeds="6 random", steps=500)
    jobs = parse_study(text, tmp_path / "t.toml").expand()
    executor = ProcessExecutor({jobs[0].model: ModelFiles(tiny_checkpoint, None)}, workers=2)
    results = executor.run(plan_batches(jobs, 2))
    next(results)
    assert len(multiprocessing.active_children()) == 2
    started = time.perf_counter()
    results.close()  # what run_study's finally does with an abandoned generator
    executor.close()
    assert time.perf_counter() - started < 5  # a 500-step batch takes about 20 s
    assert multiprocessing.active_children() == []

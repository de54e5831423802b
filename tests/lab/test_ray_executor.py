"""The Ray executor's own code in this process: a stand-in ``ray`` module runs each actor call when
the driver waits for it, so the executor's scheduling (workers per model, at most two batches queued
per worker, results written as they come, a worker's error failing its batch) runs without worker
processes. The same study on a real local Ray cluster is test_ray.py's (slow suite)."""

from __future__ import annotations

import sys
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lab_helpers import EXPLAIN_FIRST_SEED, explanations, quiet, study_text

from voidprompt.lab.catalog import Catalog
from voidprompt.lab.run import run_study
from voidprompt.lab.study import parse_study


class _Actor:
    def __init__(self, options: dict[str, Any], gpu_ids: list[int]) -> None:
        self.options, self.gpu_ids = options, gpu_ids
        self.dead = False


class _Ref:
    def __init__(self, actor: _Actor, method: str, args: tuple[Any, ...], call: Callable[[], Any]) -> None:
        self.actor, self.method, self.args, self.call = actor, method, args, call


class RayActorError(Exception):
    """Stands in for ray.exceptions.RayActorError: the worker process is gone."""


class StandInRay(types.ModuleType):
    """What the executor uses of ``ray``, run in this process: ``remote`` wraps the actor class,
    ``wait`` returns the oldest call and ``get`` runs it there (raising what the worker raised, or
    the actor error of a worker that died). Declared GPUs go to actors by ``num_gpus``, one id each,
    and a worker asking ``get_gpu_ids`` during a call gets its own."""

    def __init__(self, cpus: int, gpus: int = 0) -> None:
        super().__init__("ray")
        self.cpus, self.gpus = cpus, gpus
        self.exceptions = types.SimpleNamespace(RayActorError=RayActorError)
        self.started = False
        self.actors: list[_Actor] = []
        self.killed: list[_Actor] = []
        self.queued: Counter[_Actor] = Counter()
        self.most_queued = 0
        self.free_gpus = list(range(gpus))
        self.calling: _Actor | None = None
        self.runs: list[tuple[_Actor, tuple[str, ...]]] = []  # (worker, job ids) of each batch run
        # (worker, batch) -> whether the worker's process dies as that batch runs
        self.dies: Callable[[_Actor, Any], bool] = lambda actor, batch: False

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **_: object) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def cluster_resources(self) -> dict[str, float]:
        return {"CPU": float(self.cpus)} | ({"GPU": float(self.gpus)} if self.gpus else {})

    def available_resources(self) -> dict[str, float]:
        return self.cluster_resources()

    def get_gpu_ids(self) -> list[int]:
        assert self.calling is not None
        return self.calling.gpu_ids

    def get_runtime_context(self) -> Any:
        return types.SimpleNamespace(get_node_id=lambda: "node-1")

    def remote(self, **options: Any) -> Callable[[type], Any]:
        def wrap(cls: type) -> Any:
            return types.SimpleNamespace(remote=lambda *args: self._actor(cls, args, options))

        return wrap

    def _actor(self, cls: type, args: tuple[Any, ...], options: dict[str, Any]) -> _Actor:
        wanted = int(options.get("num_gpus", 0))
        gpu_ids, self.free_gpus = self.free_gpus[:wanted], self.free_gpus[wanted:]
        actor = _Actor(options, gpu_ids)
        self.calling = actor
        instance = cls(*args)
        self.calling = None
        for method in ("run", "describe"):
            bound = getattr(instance, method)
            setattr(actor, method, types.SimpleNamespace(
                remote=lambda *a, bound=bound, method=method: self._submit(actor, method, a, bound)
            ))  # fmt: skip
        self.actors.append(actor)
        return actor

    def _submit(self, actor: _Actor, method: str, args: tuple[Any, ...], call: Callable[..., Any]) -> _Ref:
        self.queued[actor] += 1
        self.most_queued = max(self.most_queued, self.queued[actor])
        return _Ref(actor, method, args, lambda: call(*args))

    def wait(self, refs: list[_Ref], num_returns: int = 1) -> tuple[list[_Ref], list[_Ref]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: Any) -> Any:
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        self.queued[ref.actor] -= 1
        if ref.method == "run" and not ref.actor.dead and self.dies(ref.actor, ref.args[0]):
            self.die(ref.actor)
        if ref.actor.dead:
            raise RayActorError("the actor died unexpectedly before finishing this task")
        self.calling = ref.actor
        try:
            result = ref.call()
        finally:
            self.calling = None
        if ref.method == "run":
            self.runs.append((ref.actor, tuple(j.job_id for j in ref.args[0].jobs)))
        return result

    def die(self, actor: _Actor) -> None:
        """The worker's process is gone: its GPUs are free again, its calls raise RayActorError."""
        actor.dead = True
        self.free_gpus += actor.gpu_ids

    def kill(self, actor: _Actor) -> None:
        self.killed.append(actor)


@pytest.fixture
def ray(monkeypatch: pytest.MonkeyPatch) -> StandInRay:
    stand_in = StandInRay(cpus=2)
    monkeypatch.setitem(sys.modules, "ray", stand_in)
    return stand_in


def _catalog(folder: Path) -> dict[str, tuple[str, str, dict[str, float], bytes]]:
    root = folder / "runs" / "t"
    with Catalog.open(root / "catalog.sqlite", readonly=True) as catalog:
        return {
            image["job_id"]: (image["path"], image["infotext"], catalog.measures(image["id"]),
                              (root / image["path"]).read_bytes())
            for image in catalog.images()
        }  # fmt: skip


def test_the_ray_executor_writes_the_local_executors_catalog(
    ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random")
    local = parse_study(text, tmp_path / "local" / "t.toml")
    distributed = parse_study(text, tmp_path / "ray" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    report = run_study(distributed, quiet(distributed, executor="ray", batch_size=2, threads=1))
    assert (report.generated, report.batches, len(report.failed)) == (8, 4, 0)
    # Two CPUs at one thread each: two workers, each with at most two batches queued, all stopped.
    assert len(ray.actors) == 2 and ray.killed == ray.actors
    assert ray.most_queued == 2
    assert not ray.started  # the executor started this Ray and shut it down
    # One process, one thread: the same pictures, byte for byte, under the same names.
    expected = _catalog(tmp_path / "local")
    assert sorted(expected) == sorted(j.job_id for j in local.expand())
    assert _catalog(tmp_path / "ray") == expected


def test_explanations_come_back_from_ray_workers_as_from_a_local_run(
    ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random") + EXPLAIN_FIRST_SEED
    local = parse_study(text, tmp_path / "local" / "t.toml")
    distributed = parse_study(text, tmp_path / "ray" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    report = run_study(distributed, quiet(distributed, executor="ray", batch_size=2, threads=1))
    assert (report.generated, len(report.failed)) == (8, 0)
    expected = explanations(tmp_path / "local")
    assert set(expected) == local.captures(local.expand()) and len(expected) == 2
    assert explanations(tmp_path / "ray") == expected
    assert _catalog(tmp_path / "ray").keys() == _catalog(tmp_path / "local").keys()


def test_a_batch_a_worker_rejects_fails_and_the_others_go_on(
    ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voidprompt.errors import InvalidRequestError
    from voidprompt.pipeline.engine import Engine

    generate = Engine.generate

    def rejecting(self: Engine, request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.width == 32:
            raise InvalidRequestError("32 px is rejected by this engine")
        return generate(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", rejecting)
    study = parse_study(
        study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random"), tmp_path / "t.toml"
    )
    report = run_study(study, quiet(study, executor="ray", batch_size=2, threads=1))
    # The two 32x16 batches (one per W) fail as wholes, with the worker's own message; the rest go on.
    assert (report.generated, report.batches, len(report.failed)) == (4, 2, 4)
    assert set(report.failed.values()) == {"32 px is rejected by this engine"}
    assert {j.job_id for j in study.expand() if j.request.width == 32} == set(report.failed)
    assert ray.killed == ray.actors


@pytest.fixture
def gpu_ray(monkeypatch: pytest.MonkeyPatch) -> StandInRay:
    stand_in = StandInRay(cpus=4, gpus=2)
    monkeypatch.setitem(sys.modules, "ray", stand_in)
    return stand_in


def test_one_worker_per_declared_gpu(gpu_ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Two GPUs declared, four CPUs: two workers (not four), each holding one GPU of its own. They
    compute on the CPU here (--device cpu), so the catalog is the local executor's."""
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random")
    local = parse_study(text, tmp_path / "local" / "t.toml")
    distributed = parse_study(text, tmp_path / "ray" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    options = quiet(distributed, executor="ray", device="cpu", batch_size=2, threads=1)
    report = run_study(distributed, options)
    assert (report.generated, report.batches, len(report.failed)) == (8, 4, 0)
    assert [a.options["num_gpus"] for a in gpu_ray.actors] == [1.0, 1.0]
    assert sorted(tuple(a.gpu_ids) for a in gpu_ray.actors) == [(0,), (1,)]
    assert {actor for actor, _ in gpu_ray.runs} == set(gpu_ray.actors)  # both GPUs worked
    assert _catalog(tmp_path / "ray") == _catalog(tmp_path / "local")
    with Catalog.open(tmp_path / "ray" / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        (run,) = catalog.runs().values()
    assert (run["executor"], run["device"], run["precision"], run["gpu_name"]) == ("ray", "cpu", "fp32", None)


def test_gpu_workers_default_to_cuda_and_say_when_it_is_missing(
    gpu_ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """No --device on a cluster with GPUs: the workers load onto cuda. This torch has no CUDA, so
    each worker's load fails and every batch fails with its one-line reason; nothing is written."""
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="1"), tmp_path / "t.toml")
    report = run_study(study, quiet(study, executor="ray", threads=1))
    assert (report.generated, len(report.failed)) == (0, 2)
    reasons = set(report.failed.values())
    assert len(reasons) == 1 and next(iter(reasons)).startswith("--device 'cuda': ")
    assert "Available here: cpu" in next(iter(reasons))
    assert not list((tmp_path / "runs" / "t" / "catalog-images").iterdir())


def test_gpus_per_worker_beyond_the_cluster_is_refused(gpu_ray: StandInRay, tmp_path: Path) -> None:
    from voidprompt.errors import StudyError
    from voidprompt.lab.ray_executor import RayExecutor

    with pytest.raises(StudyError, match=r"--gpus-per-worker 4: the Ray cluster has 2 GPUs"):
        RayExecutor({}, gpus_per_worker=4)
    assert not gpu_ray.started  # the Ray it started is shut down again
    assert RayExecutor({}, gpus_per_worker=0.5).workers == 4  # two per GPU, one CPU each
    executor = RayExecutor({})  # GPUs in the cluster: one per worker, on cuda
    assert (executor.gpus, executor.workers, executor.placement.device) == (1.0, 2, "cuda")
    assert executor.on_gpu


def test_a_lost_workers_batches_run_elsewhere_once(
    ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random")
    local = parse_study(text, tmp_path / "local" / "t.toml")
    distributed = parse_study(text, tmp_path / "ray" / "t.toml")
    run_study(local, quiet(local, batch_size=2, threads=1))
    # The second worker's process dies as its first batch runs (it holds two batches then).
    ray.dies = lambda actor, batch: actor is ray.actors[1]
    report = run_study(distributed, quiet(distributed, executor="ray", batch_size=2, threads=1))
    assert (report.generated, report.batches, len(report.failed)) == (8, 4, 0)
    lost = ray.actors[1]
    assert lost.dead and len(ray.actors) == 3  # a replacement was started
    ran = [jobs for actor, jobs in ray.runs]
    assert lost not in {actor for actor, _ in ray.runs}
    assert sorted(j for jobs in ran for j in jobs) == sorted(j.job_id for j in local.expand())  # each once
    assert _catalog(tmp_path / "ray") == _catalog(tmp_path / "local")


def test_a_batch_that_takes_every_worker_down_fails_alone(
    ray: StandInRay, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from voidprompt.lab.execution import MAX_ATTEMPTS

    study = parse_study(
        study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random"), tmp_path / "t.toml"
    )
    deadly = study.expand()[0].job_id
    ray.dies = lambda actor, batch: deadly in {j.job_id for j in batch.jobs}
    report = run_study(study, quiet(study, executor="ray", batch_size=2, threads=1))
    assert (report.generated, report.batches) == (6, 3)
    assert deadly in report.failed and len(report.failed) == 2
    assert set(report.failed.values()) == {f"{MAX_ATTEMPTS} Ray workers died running this batch"}
    assert sum(a.dead for a in ray.actors) == MAX_ATTEMPTS

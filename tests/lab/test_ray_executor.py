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
from lab_helpers import quiet, study_text

from voidprompt.lab.catalog import Catalog
from voidprompt.lab.run import run_study
from voidprompt.lab.study import parse_study


class _Actor:
    run: Any


class _Ref:
    def __init__(self, actor: _Actor, call: Callable[[], Any]) -> None:
        self.actor, self.call = actor, call


class StandInRay(types.ModuleType):
    """What the executor uses of ``ray``, run in this process: ``remote`` wraps the actor class,
    ``wait`` returns the oldest call and ``get`` runs it there (raising what the worker raised)."""

    def __init__(self, cpus: int) -> None:
        super().__init__("ray")
        self.cpus = cpus
        self.started = False
        self.actors: list[_Actor] = []
        self.killed: list[_Actor] = []
        self.queued: Counter[_Actor] = Counter()
        self.most_queued = 0

    def is_initialized(self) -> bool:
        return self.started

    def init(self, **_: object) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def available_resources(self) -> dict[str, float]:
        return {"CPU": float(self.cpus)}

    def remote(self, **_: object) -> Callable[[type], Any]:
        def wrap(cls: type) -> Any:
            return types.SimpleNamespace(remote=lambda *args: self._actor(cls(*args)))

        return wrap

    def _actor(self, instance: Any) -> _Actor:
        actor = _Actor()
        actor.run = types.SimpleNamespace(
            remote=lambda batch: self._submit(actor, lambda: instance.run(batch))
        )
        self.actors.append(actor)
        return actor

    def _submit(self, actor: _Actor, call: Callable[[], Any]) -> _Ref:
        self.queued[actor] += 1
        self.most_queued = max(self.most_queued, self.queued[actor])
        return _Ref(actor, call)

    def wait(self, refs: list[_Ref], num_returns: int = 1) -> tuple[list[_Ref], list[_Ref]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: _Ref) -> Any:
        self.queued[ref.actor] -= 1
        return ref.call()

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

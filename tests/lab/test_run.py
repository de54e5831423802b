"""run_study: batching, per-image seeds, catalog rows, measures, labels, resume after crashes."""

import errno
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lab_helpers import quiet, study_text
from PIL import Image

from voidprompt.demo.labeler import WORLD_CLASSES
from voidprompt.errors import StudyError
from voidprompt.lab.catalog import TEMP_PREFIX, Catalog, DiskFullError, sha256_file
from voidprompt.lab.execution import generate_batch
from voidprompt.lab.measures import MEASURES, measure_image
from voidprompt.lab.plugins import Plugins, installed_plugins
from voidprompt.lab.run import plan_batches, run_study
from voidprompt.lab.study import ModelRef, Study, load_study, parse_study
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

REPO = Path(__file__).resolve().parents[2]


class Crash(Exception):
    """Stands in for a kill: not a VoidpromptError, so nothing catches it."""


def test_plan_batches_groups_by_shape_and_settings(tmp_path: Path) -> None:
    study = parse_study(study_text(tmp_path / "x.safetensors", seeds="3 random"), tmp_path / "t.toml")
    jobs = study.expand()
    assert len(jobs) == 12
    batches = plan_batches(jobs, batch_size=8)
    # 2 sizes x 2 W: four groups of three seeds each, every batch one shape and one prompt.
    assert len(batches) == 4
    for batch in batches:
        assert len({(j.request.width, j.request.height, j.request.negative_prompt) for j in batch.jobs}) == 1
        assert len(set(batch.seeds)) == 3
    assert sorted(j.job_id for b in batches for j in b.jobs) == sorted(j.job_id for j in jobs)
    assert [len(b.jobs) for b in plan_batches(jobs, batch_size=2)] == [2, 1] * 4
    with pytest.raises(StudyError, match="batch_size=0"):
        plan_batches(jobs, 0)


def test_generate_batch_matches_engine(tiny_checkpoint: Path) -> None:
    engine = Engine(load_model(tiny_checkpoint))
    request = GenerationRequest(negative_prompt="(text:1.2)", steps=3, width=16, height=16,
                                sampler_name="Euler a", seed=100)  # fmt: skip
    # Consecutive seeds: exactly what Engine.generate does for a batch (A1111's seed + i).
    expected = engine.generate(request.replace(batch_size=2))
    images, infotexts, _, _ = generate_batch(engine, request, [100, 101], [request.subseed] * 2)
    assert [np.asarray(i).tobytes() for i in images] == [np.asarray(i).tobytes() for i in expected.images]
    assert infotexts == expected.infotexts
    # Arbitrary seeds: each image equals its own single-image generation (up to batch float order).
    images, infotexts, _, _ = generate_batch(engine, request, [7, 100], [request.subseed] * 2)
    alone = engine.generate(request.replace(seed=7)).images[0]
    diff = np.abs(np.asarray(images[0], dtype=int) - np.asarray(alone, dtype=int))
    assert diff.max() <= 2
    assert np.array_equal(np.asarray(images[1]), np.asarray(expected.images[0]))
    assert "Seed: 7," in infotexts[0] and "Seed: 100," in infotexts[1]


def test_end_to_end_smoke_study(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = (REPO / "studies" / "smoke.toml").read_text() + f'\n[model]\ncheckpoint = "{tiny_checkpoint}"\n'
    # The study's sizes are the miniature model's; the tiny random checkpoint runs them small.
    text = text.replace('size = "128x128, 128x64"', 'size = "32x32, 64x32"')
    assert 'size = "32x32, 64x32"' in text
    (tmp_path / "smoke.toml").write_text(text)
    study = load_study(tmp_path / "smoke.toml")
    report = run_study(study, quiet(study, batch_size=4))
    assert (report.total, report.generated, report.skipped, report.batches) == (8, 8, 0, 4)
    catalog_path = tmp_path / "runs" / "smoke" / "catalog.sqlite"
    assert report.catalog_path == catalog_path
    with Catalog.open(catalog_path, readonly=True) as catalog:
        images = catalog.images()
        assert len(images) == 8
        by_job = {j.job_id: j for j in study.expand()}
        for row in images:
            file = catalog_path.parent / row["path"]
            assert sha256_file(file) == row["sha256"]
            job = by_job[row["job_id"]]
            assert (row["width"], row["height"]) == (job.request.width, job.request.height)
            assert row["seed"] == job.request.seed
            assert f"Seed: {job.request.seed}," in row["infotext"]
            with Image.open(file) as png:
                assert png.info["parameters"] == row["infotext"]
                assert catalog.measures(row["id"]) == pytest.approx(measure_image(png))
            assert set(catalog.measures(row["id"])) == set(MEASURES)
            assert row["timings"]["batch_size"] == 2.0
        assert catalog.summary().labelled == 0  # smoke.toml says labeler = "none"
    again = run_study(study, quiet(study, batch_size=4))
    assert (again.generated, again.skipped) == (0, 8)


def test_detector_prelabels(tiny_checkpoint: Path, tmp_path: Path) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="1", labels='labeler = "detector"')
    study = parse_study(text, tmp_path / "t.toml")
    run_study(study, quiet(study))
    with Catalog.open(tmp_path / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        labels = catalog.all_labels()
    assert len(labels) == 2
    for sources in labels.values():
        label_class, tags = sources["detector"]
        assert label_class in WORLD_CLASSES
        assert any(t.endswith("background") for t in tags)


def test_run_study_tells_the_labeler_the_models_native_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from voidprompt.lab.labels import Label
    from voidprompt.testing.fake_checkpoints import TINY_CONSTANTS

    class Sized:
        name, classes = "sized", ("a",)

        def __init__(self) -> None:
            self.seen: list[int | None] = []

        def label(self, image: Image.Image, native_size: int | None = None) -> Label:
            self.seen.append(native_size)
            return Label("a")

    class Plain:  # a plugin written before native_size: still called with the picture alone
        name, classes = "plain", ("a",)

        def label(self, image: Image.Image) -> Label:
            return Label("a", ("plain",))

    sized = Sized()
    # Labelers reach a study by name only: here registered by the caller, not installed.
    plugins = Plugins(labelers={"sized": lambda: sized, "plain": Plain})

    def study(labeler: str) -> Study:
        text = study_text(tiny_checkpoint, sizes="16x16", seeds="2 random", labels=f'labeler = "{labeler}"')
        return parse_study(text, tmp_path / "t.toml")

    report = run_study(study("sized"), quiet(study("sized"), catalog=tmp_path / "a.sqlite"), plugins)
    # The file's voidprompt.arch metadata, not the size asked for (16 px).
    assert report.generated >= 2 and sized.seen == [TINY_CONSTANTS.vae_sample_size] * report.generated
    run_study(study("plain"), quiet(study("plain"), catalog=tmp_path / "b.sqlite"), plugins)
    with Catalog.open(tmp_path / "b.sqlite", readonly=True) as catalog:
        labels = [s["plain"] for s in catalog.all_labels().values()]
    assert labels == [("a", ["plain"])] * report.generated


def _state(catalog_path: Path) -> tuple[list[str], list[str], int]:
    db = sqlite3.connect(catalog_path)
    rows = [r[0] for r in db.execute("SELECT job_id FROM images ORDER BY job_id")]
    measured = db.execute("SELECT COUNT(DISTINCT image_id) FROM measures").fetchone()[0]
    db.close()
    files = sorted(p.name for p in (catalog_path.parent / "catalog-images").iterdir())
    return rows, files, measured


@pytest.mark.parametrize("stage", ["before_write", "temp_written", "renamed", "recorded"])
def test_resume_after_crash(tiny_checkpoint: Path, tmp_path: Path, stage: str) -> None:
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="2 random"), tmp_path / "t.toml")
    seen: list[str] = []

    def fault(at: str, job_id: str) -> None:
        if at == stage:
            seen.append(job_id)
            if len(seen) == 3:  # the first image of the second batch: mid-run, mid-batch
                raise Crash(job_id)

    with pytest.raises(Crash):
        run_study(study, quiet(study, batch_size=2), fault=fault)
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    rows, files, _ = _state(path)
    committed = 3 if stage == "recorded" else 2
    assert len(rows) == committed
    leftovers = [f for f in files if f.startswith(TEMP_PREFIX) or f[:-4] not in rows]
    assert len(leftovers) == (1 if stage in ("renamed",) else 0)  # a renamed file awaiting its row
    report = run_study(study, quiet(study, batch_size=2))
    assert (report.skipped, report.generated) == (committed, 4 - committed)
    rows, files, measured = _state(path)
    jobs = sorted(j.job_id for j in study.expand())
    assert rows == jobs  # no loss, no duplicate (job_id is UNIQUE in images)
    assert files == [f"{j}.png" for j in jobs]  # no temp file, no orphan
    assert measured == 4


# Runs a study in a process of its own and kills it (SIGKILL: no cleanup, no finally) when the
# run reaches ``stage`` for the ``count``-th time; the stages are run.Fault's.
KILLED_RUN = """
import os, signal, sys
from voidprompt.lab.run import run_study
from voidprompt.lab.study import load_study

study = load_study(sys.argv[1])
stage, count, seen = sys.argv[2], int(sys.argv[3]), []

def fault(at, job_id):
    if at == stage:
        seen.append(job_id)
        if len(seen) == count:
            os.kill(os.getpid(), signal.SIGKILL)

run_study(study, study.run.override(progress=False, batch_size=2, threads=1), fault=fault)
sys.exit(3)  # the kill never came
"""


def _kill_and_resume(tiny_checkpoint: Path, tmp_path: Path, stage: str, count: int) -> int:
    """Kill a run of 8 jobs (4 batches of 2) at ``stage`` #``count``, resume it, check that every job
    has exactly one image, the same file an uninterrupted run writes; returns the images committed
    before the kill."""
    import signal
    import subprocess
    import sys

    text = study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random")
    (tmp_path / "t.toml").write_text(text)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "t.toml"), stage, str(count)])
    assert killed.returncode == -signal.SIGKILL
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    committed, files, _ = _state(path)
    # At most the batches in flight are lost: the one being sampled, WRITER_QUEUE waiting and the
    # one being written; what is on disk beyond the rows is at most the image being written.
    assert len([f for f in files if f.startswith(TEMP_PREFIX) or f[:-4] not in committed]) <= 1
    study = load_study(tmp_path / "t.toml")
    report = run_study(study, quiet(study, batch_size=2, threads=1))
    assert (report.skipped, report.generated, report.failed) == (len(committed), 8 - len(committed), {})
    rows, files, measured = _state(path)
    jobs = sorted(j.job_id for j in study.expand())
    assert rows == jobs and measured == 8  # no loss, no duplicate (job_id is UNIQUE in images)
    assert files == [f"{j}.png" for j in jobs]  # no temp file, no orphan
    reference = parse_study(text, tmp_path / "reference" / "t.toml")
    run_study(reference, quiet(reference, batch_size=2, threads=1))
    with (
        Catalog.open(path, readonly=True) as catalog,
        Catalog.open(tmp_path / "reference" / "runs" / "t" / "catalog.sqlite", readonly=True) as whole,
    ):
        assert {i["job_id"]: i["sha256"] for i in catalog.images()} == {
            i["job_id"]: i["sha256"] for i in whole.images()
        }  # no half-written file: each is the uninterrupted run's, byte for byte
        for image in catalog.images():
            assert sha256_file(path.parent / image["path"]) == image["sha256"]
    return len(committed)


def test_kill_9_while_the_writer_holds_a_renamed_image(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The third image (the second batch's first) renamed but not committed, the next batch sampling.
    assert _kill_and_resume(tiny_checkpoint, tmp_path, "renamed", 3) == 2


@pytest.mark.slow  # one process per kill point
@pytest.mark.parametrize(
    ("stage", "count", "committed"),
    [
        ("before_write", 1, 0),
        ("temp_written", 3, 2),
        ("recorded", 3, 3),
        ("recorded", 8, 8),
        ("before_write", 7, 6),
    ],
)
def test_kill_9_at_each_writer_stage(
    tiny_checkpoint: Path, tmp_path: Path, stage: str, count: int, committed: int
) -> None:
    assert _kill_and_resume(tiny_checkpoint, tmp_path, stage, count) == committed


@pytest.mark.slow  # one process per kill point
@pytest.mark.parametrize("count", [1, 2, 4])
def test_kill_9_as_a_batch_comes_back_from_sampling(
    tiny_checkpoint: Path, tmp_path: Path, count: int
) -> None:
    # The writer may be anywhere in the earlier batches: whatever it committed stays, the rest is redone.
    committed = _kill_and_resume(tiny_checkpoint, tmp_path, "sampled", count)
    assert 0 <= committed <= 2 * (count - 1)


def test_writing_overlaps_the_next_batchs_sampling(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch's pictures are labelled (on the writer's thread) while the second batch
    samples (on the caller's): the labeler waits for that sampling to start, which a run that
    wrote before sampling again would never reach."""
    import threading

    from voidprompt.lab.labels import Label

    second_sampling = threading.Event()
    sampled_on: list[str] = []
    labelled_on: list[str] = []
    overlapped: list[bool] = []
    generate = Engine.generate

    def watching(self: Engine, *args: Any, **kwargs: Any) -> Any:
        sampled_on.append(threading.current_thread().name)
        if len(sampled_on) == 2:
            second_sampling.set()
        return generate(self, *args, **kwargs)

    class Waiting:
        name, classes = "waiting", ("a",)

        def label(self, image: Image.Image) -> Label:
            labelled_on.append(threading.current_thread().name)
            overlapped.append(second_sampling.wait(timeout=60))
            return Label("a")

    monkeypatch.setattr(Engine, "generate", watching)
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="2 random", labels='labeler = "waiting"')
    study = parse_study(text, tmp_path / "t.toml")
    report = run_study(study, quiet(study, batch_size=2), Plugins(labelers={"waiting": Waiting}))
    assert (report.generated, report.batches) == (4, 2)
    assert overlapped == [True] * 4
    assert set(sampled_on) == {threading.current_thread().name}
    assert set(labelled_on) == {"voidprompt-catalog-writer"}


def test_crash_in_a_batch_loses_only_that_batch(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="2 random"), tmp_path / "t.toml")

    def fault(at: str, job_id: str) -> None:
        if at == "before_write" and job_id == study.expand()[2].job_id:
            raise Crash(job_id)

    with pytest.raises(Crash):
        run_study(study, quiet(study, batch_size=2), fault=fault)
    rows, _, _ = _state(tmp_path / "runs" / "t" / "catalog.sqlite")
    assert rows == sorted(j.job_id for j in study.expand()[:2])


def _png_saves_fill_the_disk(monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    """The runner's PNG writes (into temporary files) fail as on a full disk after ``after`` of
    them, each having written part of its file first."""
    real_save = Image.Image.save
    saves: list[str] = []

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(fp, str | Path) and Path(fp).name.startswith(TEMP_PREFIX):
            saves.append(str(fp))
            if len(saves) > after:
                Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def _resumes_completely(study: Study, catalog_path: Path, committed: int) -> None:
    report = run_study(study, quiet(study, batch_size=2))
    assert (report.skipped, report.generated, report.failed) == (committed, 4 - committed, {})
    rows, files, measured = _state(catalog_path)
    jobs = sorted(j.job_id for j in study.expand())
    assert rows == jobs  # no loss, no duplicate
    assert files == [f"{j}.png" for j in jobs]  # no half-written or orphaned file
    assert measured == 4


def test_a_full_disk_while_saving_a_picture_is_one_clear_error_and_the_run_resumes(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="2 random"), tmp_path / "t.toml")
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    _png_saves_fill_the_disk(monkeypatch, after=2)  # the first image of the second batch
    with pytest.raises(DiskFullError) as caught:
        run_study(study, quiet(study, batch_size=2))
    images = path.parent / "catalog-images"
    assert str(caught.value) == f"disk full at {images}; free space and run again to resume"
    rows, files, _ = _state(path)
    assert len(rows) == 2 and files == [f"{job}.png" for job in rows]  # the half-written file is gone
    monkeypatch.undo()  # space freed
    _resumes_completely(study, path, committed=2)


class _FullAtCommit:
    """A catalog's connection whose COMMITs fail as SQLite's do when the disk is full."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def test_a_full_disk_at_the_catalogs_commit_is_one_clear_error_and_the_run_resumes(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="2 random"), tmp_path / "t.toml")
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    real_record = Catalog.record_image
    recorded: list[str] = []

    def record_image(self: Catalog, job_id: str, *args: Any, **kwargs: Any) -> int:
        recorded.append(job_id)
        if len(recorded) == 3:  # the disk fills up under the third image's row
            self._db = _FullAtCommit(self._db)  # type: ignore[assignment]
        return real_record(self, job_id, *args, **kwargs)

    monkeypatch.setattr(Catalog, "record_image", record_image)
    with pytest.raises(DiskFullError) as caught:
        run_study(study, quiet(study, batch_size=2))
    assert str(caught.value) == f"disk full at {path}; free space and run again to resume"
    rows, files, _ = _state(path)
    assert len(rows) == 2 and len(files) == 3  # the third picture was renamed into place, not recorded
    monkeypatch.undo()
    _resumes_completely(study, path, committed=2)


def test_study_run_on_a_full_disk_says_so_in_one_line_with_exit_code_2(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from voidprompt.cli import main

    study_file = tmp_path / "t.toml"
    study_file.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1"))
    _png_saves_fill_the_disk(monkeypatch, after=0)
    assert main(["study", "run", str(study_file), "--no-progress"]) == 2
    images = tmp_path / "runs" / "t" / "catalog-images"
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: disk full at {images}; free space and run again to resume"
    assert "Traceback" not in err


def test_model_resolution_errors(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match=r"no file at .*missing\.safetensors"):
        installed_plugins().resolve_model(ModelRef("missing.safetensors"), tmp_path)
    # No model registered as the default: a study that names no checkpoint is told to name one.
    with pytest.raises(StudyError, match=r"names no checkpoint and no default model is installed"):
        Plugins().resolve_model(ModelRef(), tmp_path)


def test_resume_refuses_a_replaced_model_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A retrained or replaced file under the same name must not finish a study the old one started."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint, model)
    study = parse_study(study_text(model, sizes="16x16", seeds="2 random"), tmp_path / "t.toml")
    run_study(study, quiet(study, batch_size=2, max_jobs=2))
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    before = _state(path)

    tensors = load_file(str(model))
    with safe_open(str(model), framework="pt") as f:
        metadata = f.metadata()  # keeps the voidprompt.arch constants
    key = next(k for k in sorted(tensors) if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(model), metadata=metadata)
    with pytest.raises(StudyError, match=r"hash .* now has hash .*mix two models"):
        run_study(study, quiet(study, batch_size=2))
    assert _state(path) == before  # nothing of the refused batch was written

    shutil.copy(tiny_checkpoint, model)  # the original file back: the study resumes
    report = run_study(study, quiet(study, batch_size=2))
    assert (report.skipped, report.generated) == (2, 2)


def test_a_batch_the_engine_rejects_is_counted_failed_and_retried(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch whose generation raises fails as a whole (A1111's one generation), the study goes on
    with the other batches, the catalog and the summaries count it, and a rerun retries it."""
    from voidprompt.errors import InvalidRequestError
    from voidprompt.lab.cli import main

    study_file = tmp_path / "t.toml"
    study_file.write_text(study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random"))
    study = load_study(study_file)
    jobs = study.expand()  # 2 sizes x 2 W x 2 seeds; batches of 2 share size and W
    bad = jobs[0]
    sibling = next(j for j in jobs[1:] if j.request.replace(seed=0) == bad.request.replace(seed=0))
    generate = Engine.generate

    def rejecting(self: Engine, request: GenerationRequest, *args: Any, **kwargs: Any) -> Any:
        shape_and_prompt = (request.width, request.negative_prompt)
        if (
            shape_and_prompt == (bad.request.width, bad.request.negative_prompt)
            and bad.request.seed in kwargs["seeds"]
        ):
            raise InvalidRequestError(f"seed {bad.request.seed} is rejected by this engine")
        return generate(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", rejecting)
    report = run_study(study, quiet(study, batch_size=2))
    assert (report.generated, report.batches) == (6, 3)
    assert set(report.failed) == {bad.job_id, sibling.job_id}
    assert report.failed[bad.job_id] == f"seed {bad.request.seed} is rejected by this engine"
    assert "6 images in 3 batches" in report.format() and "; 2 failed;" in report.format()
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    with Catalog.open(path, readonly=True) as catalog:
        status = {r.job_id: r.status for r in catalog.jobs()}
        summary = catalog.summary()
    assert {j for j, s in status.items() if s == "failed"} == {bad.job_id, sibling.job_id}
    assert sum(s == "done" for s in status.values()) == 6
    assert (summary.done, summary.pending, summary.failed, summary.images) == (6, 0, 2, 6)
    assert main(["ls", str(study_file), "--limit", "0"]) == 0
    assert "jobs: 8 (6 done, 0 pending, 2 failed)" in capsys.readouterr().out
    # Still rejected: `study run` says so and exits 1; nothing else is generated again.
    assert main(["run", str(study_file), "--no-progress", "--batch-size", "2"]) == 1
    out = capsys.readouterr().out
    assert "0 images in 0 batches" in out and "6 were already done; 2 failed" in out
    assert "rejected by this engine" in out and "run the study again" in out

    monkeypatch.setattr(Engine, "generate", generate)  # the cause fixed: the rerun retries the two
    again = run_study(study, quiet(study, batch_size=2))
    assert (again.skipped, again.generated, again.failed) == (6, 2, {})
    with Catalog.open(path, readonly=True) as catalog:
        assert {r.status for r in catalog.jobs()} == {"done"}
        assert (catalog.summary().failed, catalog.summary().images) == (0, 8)


def test_a_picture_that_cannot_be_labelled_fails_its_job_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from voidprompt.lab.labels import Label

    calls = []

    class Picky:
        name, classes = "picky", ("a",)

        def label(self, image: Image.Image) -> Label:
            calls.append(image.size)
            if len(calls) == 2:
                raise StudyError("this picture cannot be read")
            return Label("a")

    plugins = Plugins(labelers={"picky": Picky})
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="2 random", labels='labeler = "picky"')
    study = parse_study(text, tmp_path / "t.toml")
    report = run_study(study, quiet(study, batch_size=4), plugins)
    assert (report.generated, report.batches, len(report.failed)) == (3, 2, 1)  # two W values
    failed = next(iter(report.failed))
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    with Catalog.open(path, readonly=True) as catalog:
        assert {r.job_id for r in catalog.jobs() if r.status == "failed"} == {failed}
        assert failed not in {i["job_id"] for i in catalog.images()} and catalog.summary().failed == 1
    again = run_study(study, quiet(study, batch_size=4), plugins)
    assert (again.skipped, again.generated, again.failed) == (3, 1, {})
    rows, files, measured = _state(path)
    assert rows == sorted(j.job_id for j in study.expand()) and measured == 4
    assert files == [f"{j}.png" for j in rows]  # the failed job's first file was swept, not kept

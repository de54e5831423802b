"""Catalog: schema, WAL, the resumable protocol under simulated crashes, queries, export."""

import hashlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from voidprompt.errors import StudyError
from voidprompt.files import TEMP_PREFIX, atomic_write, temp_path_for
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.study import Job, parse_study

STUDY = '[study]\nname = "t"\nmaster_seed = 1\n[axes]\nseed = "1-4"'


def jobs() -> list[Job]:
    return parse_study(STUDY, "t.toml").expand()


def new_catalog(tmp_path: Path) -> Catalog:
    catalog = Catalog.open(tmp_path / "t.sqlite")
    catalog.register_study("t", STUDY)
    assert catalog.register_jobs(jobs()) == 4
    return catalog


def finish(catalog: Catalog, job: Job, data: bytes = b"png", measures: dict[str, float] | None = None) -> int:
    """The runner's protocol: temp -> rename -> commit."""
    final = catalog.images_dir / f"{job.job_id}.png"
    atomic_write(final, lambda temp: temp.write_bytes(data))
    return catalog.record_image(
        job.job_id, final, hashlib.sha256(data).hexdigest(), "infotext",
        seed=job.request.seed, width=64, height=64, timings={"sample": 0.5}, measures=measures,
    )  # fmt: skip


def test_schema_and_wal(tmp_path: Path) -> None:
    with new_catalog(tmp_path) as catalog:
        assert catalog.journal_mode() == "wal"
        assert catalog.register_jobs(jobs()) == 0  # known ids are ignored
    db = sqlite3.connect(tmp_path / "t.sqlite")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"study", "jobs", "images", "measures", "labels", "runs", "tag_measures"}
    with pytest.raises(sqlite3.IntegrityError):
        sql = "INSERT INTO jobs (job_id, position, axis_values, request, model) VALUES (?, 9, '', '', '')"
        db.execute(sql, (jobs()[0].job_id,))


def test_resume_after_crashes(tmp_path: Path) -> None:
    j0, j1, j2, j3 = jobs()
    catalog = new_catalog(tmp_path)
    finish(catalog, j0)  # committed
    folder = catalog.images_dir
    # crash 1: temp written, never renamed
    temp_path_for(folder / f"{j1.job_id}.png").write_bytes(b"half")
    # crash 2: renamed into place, row never committed
    (folder / f"{j2.job_id}.png").write_bytes(b"png")
    catalog.close()  # the process dies; j3 was never started

    catalog = Catalog.open(tmp_path / "t.sqlite")
    assert (catalog.last_sweep.temp_files, catalog.last_sweep.orphan_images) == (1, 1)
    assert [j.job_id for j in catalog.pending_jobs()] == [j1.job_id, j2.job_id, j3.job_id]
    assert sorted(p.name for p in folder.iterdir()) == [f"{j0.job_id}.png"]
    for job in (j1, j2, j3):
        finish(catalog, job)
    assert catalog.pending_jobs() == []
    summary = catalog.summary()
    assert (summary.jobs, summary.done, summary.pending, summary.images) == (4, 4, 0, 4)
    assert len(list(folder.iterdir())) == 4
    with pytest.raises(StudyError, match="already has an image"):
        finish(catalog, j0)
    catalog.close()


CRASH_IN_TRANSACTION = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO images (job_id, path, sha256, infotext, settings, seed, width, height, timings, "
           "created) VALUES (?, ?, 'x', '', '{}', 1, 64, 64, '{}', '')", (sys.argv[2], sys.argv[3]))
db.execute("UPDATE jobs SET status = 'done' WHERE job_id = ?", (sys.argv[2],))
os._exit(1)  # killed before COMMIT
"""


def test_crash_inside_the_commit(tmp_path: Path) -> None:
    job = jobs()[0]
    catalog = new_catalog(tmp_path)
    final = catalog.images_dir / f"{job.job_id}.png"
    final.write_bytes(b"png")
    catalog.close()
    rel = f"t-images/{final.name}"
    result = subprocess.run(
        [sys.executable, "-c", CRASH_IN_TRANSACTION, str(tmp_path / "t.sqlite"), job.job_id, rel]
    )
    assert result.returncode == 1
    with Catalog.open(tmp_path / "t.sqlite") as catalog:
        assert catalog.last_sweep.orphan_images == 1
        assert len(catalog.pending_jobs()) == 4
        assert catalog.summary().done == 0
        assert sqlite3.connect(tmp_path / "t.sqlite").execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_record_checks(tmp_path: Path) -> None:
    job = jobs()[0]
    with new_catalog(tmp_path) as catalog:
        with pytest.raises(StudyError, match="does not exist"):
            catalog.record_image(job.job_id, catalog.images_dir / "x.png", "0", "", seed=1, width=8, height=8)
        temp = catalog.images_dir / f"{TEMP_PREFIX}x.png"
        temp.write_bytes(b"a")
        with pytest.raises(StudyError, match="temporary name"):
            catalog.record_image(job.job_id, temp, "0", "", seed=1, width=8, height=8)
        (catalog.images_dir / "y.png").write_bytes(b"a")
        with pytest.raises(StudyError, match="unknown job"):
            catalog.record_image("nope", catalog.images_dir / "y.png", hashlib.sha256(b"a").hexdigest(), "",
                                 seed=1, width=8, height=8)  # fmt: skip
        with pytest.raises(StudyError, match="sha256"):
            catalog.record_image(job.job_id, catalog.images_dir / "y.png", "0", "", seed=1, width=8, height=8)


def test_one_writer(tmp_path: Path) -> None:
    with new_catalog(tmp_path) as catalog:
        with pytest.raises(StudyError, match="another process is writing"):
            Catalog.open(tmp_path / "t.sqlite")
        finish(catalog, jobs()[0])
        reader = Catalog.open(tmp_path / "t.sqlite", readonly=True)
        assert reader.summary().images == 1
        with pytest.raises(StudyError, match="read-only"):
            reader.sweep()
        reader.close()


def test_one_writer_through_symlinks(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "folder-link").symlink_to(real, target_is_directory=True)
    (tmp_path / "file-link.sqlite").symlink_to(real / "t.sqlite")
    with new_catalog(real):
        for other in (tmp_path / "folder-link" / "t.sqlite", tmp_path / "file-link.sqlite"):
            with pytest.raises(StudyError, match="another process is writing"):
                Catalog.open(other)
    # Once the writer is gone, the same catalog opens through either link.
    with Catalog.open(tmp_path / "folder-link" / "t.sqlite") as catalog:
        assert catalog.summary().jobs == 4


class _FullAtCommit:
    """A connection whose COMMITs fail as SQLite's do when the disk is full (while ``full``)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self.full = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if self.full and sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._connection, name)


def test_a_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    with new_catalog(tmp_path) as catalog:
        real = catalog._db
        catalog._db = full = _FullAtCommit(real)  # type: ignore[assignment]
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            finish(catalog, jobs()[0])
        assert not real.in_transaction
        assert real.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
        full.full = False  # space freed: the same catalog goes on writing
        finish(catalog, jobs()[1])
        assert catalog.summary().images == 1


def test_measures_and_labels(tmp_path: Path) -> None:
    with new_catalog(tmp_path) as catalog:
        image_id = finish(catalog, jobs()[0], measures={"regions": 2, "luminance": 0.25})
        catalog.set_label(image_id, "Pattern", ["stripes"])
        catalog.set_label(image_id, "Object or Scenery", source="detector")
        assert catalog.measures(image_id) == {"luminance": 0.25, "regions": 2.0}
        assert catalog.all_measures() == {image_id: {"luminance": 0.25, "regions": 2.0}}
        assert catalog.labels(image_id) == {
            "human": ("Pattern", ["stripes"]),
            "detector": ("Object or Scenery", []),
        }
        images = catalog.images()
        assert images[0]["axis_values"] == {"seed": 1} and images[0]["timings"] == {"sample": 0.5}
        summary = catalog.summary()
        assert (summary.name, summary.measured, summary.labelled) == ("t", 1, 1)
        assert "1 done, 3 pending" in summary.format()

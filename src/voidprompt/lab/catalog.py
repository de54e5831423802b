"""The study catalog: one SQLite file per study (WAL, foreign keys on) plus its image folder.

The resumable protocol, which keeps files and rows consistent whatever moment a run dies at:

1. write the image to a temporary name in the image folder (``voidprompt.files.atomic_write``),
2. rename it into place,
3. commit its row (``Catalog.record_image``, one transaction that also marks the job done).

A crash leaves at most a temporary file (before 2) or an image without a row (before 3). The
writer's ``Catalog.open`` sweeps both away, so the job is pending again and is generated once
more: no loss, no duplicate. Only one writer may hold a catalog (an exclusive lock file), so the
sweep can never remove the file of a run that is still going; readers open with ``readonly=True``.

Provenance: each image row names the batch size it was generated in (GPU kernels pick algorithms
per shape, so pixels can change with it) and its ``runs`` row: the device, precision, GPU name and
torch and CUDA versions that made it. A catalog written before these columns existed gains them
when a writer opens it (its old images keep NULL there); readers open it as it is.

Explanations: an image generated with the capture on has its ``NAME.explain.npz`` beside it, written
(temp, rename) before the PNG, and named by the row's ``explanation`` column (NULL without capture);
its per-tag attention measures go to the long ``tag_measures`` table in the image's transaction.
The sweep removes an explanation file no row names, as it does an image.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from voidprompt import __version__
from voidprompt.errors import StudyError
from voidprompt.explain.measures import TagMeasure
from voidprompt.explain.store import SUFFIX as EXPLANATION_SUFFIX
from voidprompt.files import TEMP_PREFIX
from voidprompt.lab.schema import StudyFile
from voidprompt.lab.study import Job, request_to_dict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS study (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    toml TEXT NOT NULL,
    created TEXT NOT NULL,
    voidprompt_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    axis_values TEXT NOT NULL,
    request TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'failed'))
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE REFERENCES jobs(job_id),
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    infotext TEXT NOT NULL,
    settings TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model_hash TEXT,
    timings TEXT NOT NULL,
    created TEXT NOT NULL,
    batch_size INTEGER,
    run_id INTEGER REFERENCES runs(id),
    explanation TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    executor TEXT NOT NULL,
    device TEXT NOT NULL,
    precision TEXT NOT NULL,
    compile INTEGER NOT NULL,
    deterministic INTEGER NOT NULL,
    gpu_name TEXT,
    torch_version TEXT NOT NULL,
    cuda_version TEXT,
    voidprompt_version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS measures (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (image_id, name)
);
CREATE TABLE IF NOT EXISTS labels (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    label_class TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    source TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (image_id, source)
);
CREATE TABLE IF NOT EXISTS tag_measures (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    branch TEXT NOT NULL,
    part INTEGER NOT NULL,
    label TEXT NOT NULL,
    weight REAL NOT NULL,
    window TEXT NOT NULL,
    mass_share REAL,
    peak_y REAL,
    peak_x REAL,
    spread REAL,
    PRIMARY KEY (image_id, tag, window)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, position);
"""
# Columns added to tables of catalogs that predate them: (table, column, declaration).
_ADDED_COLUMNS = (
    ("images", "batch_size", "INTEGER"),
    ("images", "run_id", "INTEGER REFERENCES runs(id)"),
    ("runs", "channels_last", "INTEGER NOT NULL DEFAULT 0"),
    ("images", "explanation", "TEXT"),
)
# An explained image's measures "guidance_difference_<window>" (in the measures table): the mean
# |cond - uncond| of the predicted clean latent over the window's denoiser calls.
GUIDANCE_MEASURE = "guidance_difference"
# Per-tag attention measures of an explanation, in the tag_measures table's column order.
TAG_MEASURE_COLUMNS = (
    "tag", "branch", "part", "label", "weight", "window", "mass_share", "peak_y", "peak_x", "spread"
)  # fmt: skip


class DiskFullError(StudyError):
    """A write of the catalog or its images found no space left on the disk (or in the quota)."""


def is_disk_full(error: BaseException) -> bool:
    """An OSError of a full disk or quota, or SQLite's "database or disk is full"."""
    if isinstance(error, sqlite3.Error):
        return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "database or disk is full" in str(error)
        )
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_stops(path: Path, retry: str = "run again to resume") -> Iterator[None]:
    """Turn a full disk met while writing a catalog (or its images) into one :class:`DiskFullError`
    ("disk full at PATH; free space and ``retry``"). PATH is the folder of the file that failed,
    else ``path`` (SQLite's errors name no file).

    Nothing needs repairing afterwards: whichever write failed, the resumable protocol leaves the
    catalog consistent, so freeing space and trying again is all there is to do.
    """
    try:
        yield
    except (OSError, sqlite3.Error) as error:
        if not is_disk_full(error):
            raise
        filename = error.filename if isinstance(error, OSError) else None
        where = Path(os.fsdecode(filename)).parent if filename else path
        raise DiskFullError(f"disk full at {where}; free space and {retry}") from error


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def default_catalog_path(study: StudyFile) -> Path:
    """Where ``study``'s catalog lives unless told otherwise: :func:`catalog_path_beside`."""
    return catalog_path_beside(study.path)


def catalog_path_beside(study_file: Path) -> Path:
    """``<study folder>/runs/<study file stem>/catalog.sqlite`` (images in ``catalog-images``)."""
    return study_file.parent / "runs" / study_file.stem / "catalog.sqlite"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Where and how images were computed; the runner records one ``runs`` row per distinct value."""

    device: str  # the torch device the model ran on, e.g. "cpu" or "cuda:0"
    precision: str  # the precision policy that ran, e.g. "fp32" or "fp16"
    torch_version: str
    cuda_version: str | None = None  # torch.version.cuda: the CUDA torch was built with
    gpu_name: str | None = None  # torch.cuda.get_device_name, on CUDA
    compile: bool = False
    deterministic: bool = False
    channels_last: bool = False  # UNet and VAE weights stored channels-last (last-bit numerics differ)


@dataclass(frozen=True)
class SweepReport:
    temp_files: int
    orphan_images: int


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    position: int
    axis_values: dict[str, Any]
    request: dict[str, Any]
    model: dict[str, Any]
    status: str


@dataclass(frozen=True)
class CatalogSummary:
    name: str | None
    created: str | None
    version: str | None
    jobs: int
    done: int
    pending: int
    failed: int
    images: int
    measured: int
    labelled: int

    def format(self) -> str:
        return (
            f"study {self.name or '?'} (created {self.created or '?'}, voidprompt {self.version or '?'})\n"
            f"jobs: {self.jobs} ({self.done} done, {self.pending} pending, {self.failed} failed)\n"
            f"images: {self.images}, measured: {self.measured}, labelled: {self.labelled}"
        )


class Catalog:
    """One study's catalog. Use ``Catalog.open``; close it (or use ``with``) when done."""

    def __init__(self, path: Path, images_dir: Path, connection: sqlite3.Connection, lock: IO[str] | None):
        self.path = path
        self.images_dir = images_dir
        self._db = connection
        self._lock = lock
        self.last_sweep = SweepReport(0, 0)

    # -------------------------------------------------------------------------------- lifecycle

    @classmethod
    def open(cls, path: str | Path, images_dir: str | Path | None = None, readonly: bool = False) -> Catalog:
        """Open (creating if needed) the catalog at ``path``; the writer sweeps crash leftovers.

        ``images_dir`` defaults to ``<stem>-images`` next to the catalog file.
        """
        # Absolute: image paths are stored relative to the catalog's folder, and a relative catalog
        # path would make the runner's image paths (relative to the working directory) ambiguous.
        path = Path(path).absolute()
        folder = (
            Path(images_dir).absolute() if images_dir is not None else path.with_name(f"{path.stem}-images")
        )
        if readonly:
            if not path.exists():
                raise StudyError(f"{path}: no catalog here; run the study first (voidprompt study run)")
            connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            connection.execute("PRAGMA foreign_keys = ON")
            return cls(path, folder, connection, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        lock = _take_lock(path)
        try:
            # The runner's writer thread commits through this connection while the main thread
            # samples; only one thread uses it at a time (the runner hands it every write).
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode = WAL")
            # NORMAL is crash-safe in WAL mode; a power cut may lose the last commits, which then
            # look like renamed-but-uncommitted images and are swept and regenerated.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.execute("PRAGMA foreign_keys = ON")
            connection.executescript(_SCHEMA)
            _add_missing_columns(connection)
        except BaseException:
            lock.close()
            raise
        catalog = cls(path, folder, connection, lock)
        catalog.last_sweep = catalog.sweep()
        return catalog

    def close(self) -> None:
        self._db.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT (a full disk), where SQLite may keep the transaction open.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def sweep(self) -> SweepReport:
        """Remove temporary files and image files that have no committed row."""
        self._require_writer()
        known = {row[0] for row in self._db.execute("SELECT path FROM images")}
        explained = {
            row[0] for row in self._db.execute("SELECT explanation FROM images WHERE explanation IS NOT NULL")
        }
        temp_files = orphans = 0
        for file in sorted(self.images_dir.rglob("*")):
            if not file.is_file():
                continue
            if file.name.startswith(TEMP_PREFIX):
                file.unlink()
                temp_files += 1
                continue
            image = file.suffix.lower() in IMAGE_SUFFIXES and self._relative(file) not in known
            if image or (file.name.endswith(EXPLANATION_SUFFIX) and self._relative(file) not in explained):
                file.unlink()
                orphans += 1
        return SweepReport(temp_files, orphans)

    def _require_writer(self) -> None:
        if self._lock is None:
            raise StudyError(f"{self.path}: opened read-only; open it without readonly=True to change it")

    def _relative(self, file: Path) -> str:
        return os.path.relpath(file, self.path.parent).replace(os.sep, "/")

    # ---------------------------------------------------------------------------------- writing

    def register_study(self, name: str, toml_text: str, version: str = __version__) -> int:
        """Record the study file; a changed file adds a row, so the history stays readable."""
        self._require_writer()
        last = self._db.execute("SELECT id, name, toml FROM study ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None and (last[1], last[2]) == (name, toml_text):
            return int(last[0])
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO study (name, toml, created, voidprompt_version) VALUES (?, ?, ?, ?)",
                (name, toml_text, _now(), version),
            )
        return int(cursor.lastrowid or 0)

    def register_run(self, provenance: Provenance, executor: str) -> int:
        """Add a ``runs`` row for images made under ``provenance``; returns its id."""
        self._require_writer()
        p = provenance
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (started, executor, device, precision, compile, deterministic, gpu_name, "
                "torch_version, cuda_version, voidprompt_version, channels_last) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (_now(), executor, p.device, p.precision, int(p.compile), int(p.deterministic), p.gpu_name,
                 p.torch_version, p.cuda_version, __version__, int(p.channels_last)),
            )  # fmt: skip
        return int(cursor.lastrowid or 0)

    def register_jobs(self, jobs: Iterable[Job]) -> int:
        """Add jobs not yet known (by ``job_id``); returns how many were new."""
        self._require_writer()
        with self._transaction() as db:
            start = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM jobs").fetchone()[0]
            before = db.total_changes
            for offset, job in enumerate(jobs):
                db.execute(
                    "INSERT OR IGNORE INTO jobs (job_id, position, axis_values, request, model) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        job.job_id,
                        start + offset,
                        _json(job.axis_values),
                        _json(request_to_dict(job.request)),
                        _json({"checkpoint": job.model.checkpoint, "vae": job.model.vae}),
                    ),
                )
            return db.total_changes - before

    def record_image(
        self,
        job_id: str,
        path: str | Path,
        sha256: str,
        infotext: str,
        *,
        settings: Mapping[str, Any] | None = None,
        seed: int,
        width: int,
        height: int,
        model_hash: str | None = None,
        timings: Mapping[str, float] | None = None,
        measures: Mapping[str, float] | None = None,
        labels: Mapping[str, tuple[str | None, Sequence[str]]] | None = None,
        batch_size: int | None = None,
        run_id: int | None = None,
        explanation: str | Path | None = None,
        tag_measures: Sequence[TagMeasure] = (),
    ) -> int:
        """Commit the row of an image already renamed into place; marks its job done. Returns its id.

        ``measures`` and ``labels`` (source -> (class, tags)) go into the same transaction, so a
        done job never lacks the measurements and pre-labels taken with it. ``batch_size`` is the
        size of the sampler run that made it; ``run_id`` its :meth:`register_run` row.
        ``explanation`` is its explanation file (already in place beside it) and ``tag_measures``
        that file's per-tag measures, committed with it.
        """
        self._require_writer()
        file = Path(path)
        if not file.is_absolute():
            file = self.path.parent / file
        if not file.is_file():
            raise StudyError(
                f"{self.path}: image {str(file)!r} for job {job_id} does not exist; write and rename it "
                "into place before recording it"
            )
        if file.name.startswith(TEMP_PREFIX):
            raise StudyError(f"{self.path}: {str(file)!r} is a temporary name; rename it into place first")
        try:
            file.resolve().relative_to(self.images_dir.resolve())
        except ValueError:
            raise StudyError(
                f"{self.path}: image {str(file)!r} is outside the catalog's image folder "
                f"{str(self.images_dir)!r}; write images there so the sweep and exports find them"
            ) from None
        explanation_path = None
        if explanation is not None:
            explained = Path(explanation)
            explained = explained if explained.is_absolute() else self.path.parent / explained
            if not explained.is_file() or explained.name.startswith(TEMP_PREFIX):
                raise StudyError(
                    f"{self.path}: explanation {str(explained)!r} for job {job_id} is not in place; write "
                    "and rename it before recording its image"
                )
            explanation_path = self._relative(explained)
        actual = sha256_file(file)
        if actual != sha256:
            raise StudyError(
                f"{self.path}: {str(file)!r} has sha256 {actual}, not {sha256}: the file changed"
            )
        with self._transaction() as db:
            job = db.execute("SELECT request FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if job is None:
                raise StudyError(f"{self.path}: unknown job {job_id}; register the study's jobs first")
            try:
                cursor = db.execute(
                    "INSERT INTO images (job_id, path, sha256, infotext, settings, seed, width, height, "
                    "model_hash, timings, created, batch_size, run_id, explanation) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        self._relative(file),
                        sha256,
                        infotext,
                        _json(settings) if settings is not None else job[0],
                        seed,
                        width,
                        height,
                        model_hash,
                        _json(dict(timings or {})),
                        _now(),
                        batch_size,
                        run_id,
                        explanation_path,
                    ),
                )
            except sqlite3.IntegrityError as error:
                raise StudyError(
                    f"{self.path}: job {job_id} already has an image (or the path is taken): {error}"
                ) from None
            image_id = int(cursor.lastrowid or 0)
            if measures:
                db.executemany(
                    "INSERT INTO measures (image_id, name, value) VALUES (?, ?, ?)",
                    [(image_id, name, float(value)) for name, value in measures.items()],
                )
            if tag_measures:
                db.executemany(
                    f"INSERT INTO tag_measures (image_id, {', '.join(TAG_MEASURE_COLUMNS)}) "
                    f"VALUES (?{', ?' * len(TAG_MEASURE_COLUMNS)})",
                    [(image_id, *(_real(getattr(m, c)) for c in TAG_MEASURE_COLUMNS)) for m in tag_measures],
                )
            for source, (label_class, tags) in (labels or {}).items():
                db.execute(
                    "INSERT INTO labels (image_id, label_class, tags, source, updated) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (image_id, label_class, json.dumps(list(tags)), source, _now()),
                )
            db.execute("UPDATE jobs SET status = 'done' WHERE job_id = ?", (job_id,))
        return image_id

    def mark_failed(self, job_id: str) -> None:
        self._require_writer()
        with self._transaction() as db:
            db.execute("UPDATE jobs SET status = 'failed' WHERE job_id = ? AND status = 'pending'", (job_id,))

    def set_label(
        self, image_id: int, label_class: str | None, tags: Sequence[str] = (), source: str = "human"
    ) -> None:
        """Set one source's label of an image (a person's and each plugin's are kept apart)."""
        self._require_writer()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO labels (image_id, label_class, tags, source, updated) "
                "VALUES (?, ?, ?, ?, ?)",
                (image_id, label_class, json.dumps(list(tags)), source, _now()),
            )

    # ---------------------------------------------------------------------------------- reading

    def _jobs(self, where: str, args: Sequence[Any] = ()) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT job_id, position, axis_values, request, model, status FROM jobs "
            f"{where} ORDER BY position",
            args,
        )
        return [
            JobRecord(r[0], r[1], json.loads(r[2]), json.loads(r[3]), json.loads(r[4]), r[5]) for r in rows
        ]

    def pending_jobs(self) -> list[JobRecord]:
        """Jobs without an image, in study order (failed ones are retried)."""
        return self._jobs("WHERE job_id NOT IN (SELECT job_id FROM images)")

    def jobs(self) -> list[JobRecord]:
        return self._jobs("")

    def images(self) -> list[dict[str, Any]]:
        """Every image row joined with its job's axis values, in study order."""
        cursor = self._db.execute(
            "SELECT images.*, jobs.axis_values FROM images JOIN jobs USING (job_id) ORDER BY jobs.position"
        )
        names = [d[0] for d in cursor.description]
        out = []
        for row in cursor:
            record = dict(zip(names, row, strict=True))
            for key in ("settings", "timings", "axis_values"):
                record[key] = json.loads(record[key])
            out.append(record)
        return out

    def runs(self) -> dict[int, dict[str, Any]]:
        """run id -> its provenance row (empty for a catalog written before runs were recorded)."""
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
            return {}
        cursor = self._db.execute("SELECT * FROM runs ORDER BY id")
        names = [d[0] for d in cursor.description]
        out = {}
        for row in cursor:
            record = dict(zip(names, row, strict=True))
            for flag in ("compile", "deterministic", "channels_last"):
                record[flag] = bool(record[flag])
            out[int(record["id"])] = record
        return out

    def image_id_for(self, *, job_id: str | None = None, path: str | None = None) -> int | None:
        """The image id of a job, or of an image path relative to the catalog's folder."""
        if job_id is not None:
            row = self._db.execute("SELECT id FROM images WHERE job_id = ?", (job_id,)).fetchone()
        else:
            row = self._db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
        return None if row is None else int(row[0])

    def all_measures(self) -> dict[int, dict[str, float]]:
        """image id -> {measure: value} for every image (one query, for reports)."""
        out: dict[int, dict[str, float]] = {}
        for image_id, name, value in self._db.execute("SELECT image_id, name, value FROM measures"):
            out.setdefault(image_id, {})[name] = value
        return out

    def all_tag_measures(self) -> list[dict[str, Any]]:
        """Every image's per-tag attention measures, one dict per (image, tag, window) with
        ``image_id`` and the :data:`TAG_MEASURE_COLUMNS` (empty for a catalog without captures)."""
        columns = ("image_id", *TAG_MEASURE_COLUMNS)
        if not self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'tag_measures'").fetchone():
            return []
        cursor = self._db.execute(f"SELECT {', '.join(columns)} FROM tag_measures ORDER BY image_id, rowid")
        return [dict(zip(columns, row, strict=True)) for row in cursor]

    def all_labels(self) -> dict[int, dict[str, tuple[str | None, list[str]]]]:
        """image id -> {source: (class, tags)} for every labelled image."""
        out: dict[int, dict[str, tuple[str | None, list[str]]]] = {}
        rows = self._db.execute("SELECT image_id, source, label_class, tags FROM labels")
        for image_id, source, label, tags in rows:
            out.setdefault(image_id, {})[source] = (label, json.loads(tags))
        return out

    def measures(self, image_id: int) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT name, value FROM measures WHERE image_id = ? ORDER BY name", (image_id,)
        )
        return {name: value for name, value in rows}

    def labels(self, image_id: int) -> dict[str, tuple[str | None, list[str]]]:
        rows = self._db.execute(
            "SELECT source, label_class, tags FROM labels WHERE image_id = ?", (image_id,)
        )
        return {source: (label, json.loads(tags)) for source, label, tags in rows}

    def summary(self) -> CatalogSummary:
        study = self._db.execute(
            "SELECT name, created, voidprompt_version FROM study ORDER BY id DESC LIMIT 1"
        ).fetchone() or (None, None, None)
        status = dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

        def count(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0])

        images = count("SELECT COUNT(*) FROM images")
        total = sum(status.values())
        return CatalogSummary(
            name=study[0],
            created=study[1],
            version=study[2],
            jobs=total,
            done=status.get("done", 0),
            pending=total - images - status.get("failed", 0),
            failed=status.get("failed", 0),
            images=images,
            measured=count("SELECT COUNT(DISTINCT image_id) FROM measures"),
            labelled=count("SELECT COUNT(DISTINCT image_id) FROM labels"),
        )

    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])


def _real(value: Any) -> Any:
    """A number as SQLite stores it: NaN (a branch that never ran) as NULL."""
    return None if isinstance(value, float) and value != value else value


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, column, declaration in _ADDED_COLUMNS:
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


def _take_lock(path: Path) -> IO[str]:
    # The lock file sits beside the real file: a symlink to the catalog (or to its folder) names
    # the same catalog and must meet the same lock.
    real = path.resolve()
    lock = real.with_name(f"{real.name}.lock").open("a+", encoding="utf-8")
    try:
        import fcntl

        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass  # no flock (Windows): one writer per catalog is then the user's responsibility
    except OSError:
        lock.close()
        raise StudyError(
            f"{path}: another process is writing this catalog; wait for it to finish, or open it "
            "read-only (readonly=True) to query it"
        ) from None
    return lock

"""Studies under ``--studies-dir``: their catalogs, images, measures and labels, and study runs.

A study is found two ways: a study file (``*.toml`` with a ``[study]`` table) whose catalog is at
the lab's default place (``runs/<stem>/catalog.sqlite`` beside it), or a catalog file
(``*.sqlite``) alone. Its id is the path relative to the studies folder, without the suffix, with
``/`` written as ``~`` so it fits one URL segment. Ids are only looked up in the scanned table,
never joined onto a path, so no id can reach outside the folder; image files are served only if
they resolve inside their catalog's image folder.

Labels are written through :class:`voidprompt.lab.catalog.Catalog` (one writer at a time, each
label its own transaction, so it is on disk when the answer is sent). A study run holds the
catalog's writer lock; label writes then answer 409 until it finishes.

Runs are ``voidprompt study run`` in a child process: the lab runner is resumable, so stopping is
a plain SIGINT/terminate, and a crash of the run cannot take the server down.

Reports are the lab's (:func:`voidprompt.lab.report.build_report`), written to its default place,
``report/`` beside the catalog. A stamp file there records a fingerprint of what the report was made
from (the study TOML, every image's hash, measures and labels, the voidprompt version); the report
is rebuilt when the fingerprint changes, so a new label or image shows in the plots on the next
visit and an unchanged study is not redrawn. Report files are served only by name from that
folder's own listing, never by joining a client's text onto a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from voidprompt import __version__
from voidprompt.errors import StudyError
from voidprompt.explain.store import explanation_path
from voidprompt.files import atomic_write_text
from voidprompt.lab.catalog import Catalog, catalog_path_beside, disk_full_stops
from voidprompt.lab.labels import DEFAULT_CLASSES, HUMAN, effective_label, label_scheme
from voidprompt.lab.report import build_report
from voidprompt.lab.study import Study, load_study, parse_study
from voidprompt.server.checkpoints import NotFoundError

log = logging.getLogger(__name__)


class CatalogBusyError(StudyError):
    """Another process (a study run) is writing the catalog."""


class ReportUnavailableError(StudyError):
    """The lab's report needs optional packages that are not installed."""


REPORT_STAMP = ".voidprompt-server-report.json"
INTERRUPT_REPEAT_S = 2.0  # a study run that has not stopped yet gets SIGINT again this often
# Names of study files saved over HTTP: one plain file name, never a path.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class StudyEntry:
    id: str
    study_file: Path | None
    catalog: Path | None

    def catalog_path(self) -> Path:
        if self.catalog is not None:
            return self.catalog
        assert self.study_file is not None
        return catalog_path_beside(self.study_file)


@dataclass
class RunHandle:
    process: subprocess.Popen[str]
    log: deque[str] = field(default_factory=lambda: deque(maxlen=50))
    reader: threading.Thread | None = None


class StudyRegistry:
    def __init__(self, folder: Path | None, *, run_args: Sequence[str] = ()) -> None:
        """``run_args`` go to every ``voidprompt study run`` this registry starts (the server's
        explicit ``--device`` / ``--precision``)."""
        self.folder = folder
        self.run_args = tuple(run_args)
        self.entries: dict[str, StudyEntry] = {}
        self.runs: dict[str, RunHandle] = {}
        self._lock = threading.Lock()
        self._report_locks: dict[str, threading.Lock] = {}
        # Drawing a report is CPU-heavy (matplotlib): one at a time, whichever the study.
        self._build_lock = threading.Lock()
        self.refresh()

    # ------------------------------------------------------------------------------------ finding

    def refresh(self) -> None:
        entries: dict[str, StudyEntry] = {}
        folder = self.folder
        if folder is None or not folder.is_dir():
            self.entries = entries
            return
        root = folder.resolve()
        catalogs_of_files: set[Path] = set()
        for path in sorted(folder.rglob("*.toml")):
            if not path.resolve().is_relative_to(root) or not _is_study_file(path):
                continue
            entry = StudyEntry(_make_id(path, folder), path, None)
            catalogs_of_files.add(entry.catalog_path().resolve())
            entries[entry.id] = entry
        for path in sorted(folder.rglob("*.sqlite")):
            if not path.resolve().is_relative_to(root) or path.resolve() in catalogs_of_files:
                continue
            entry = StudyEntry(_make_id(path, folder), None, path)
            entries[entry.id] = entry
        self.entries = entries

    def get(self, study_id: str) -> StudyEntry:
        entry = self.entries.get(study_id)
        if entry is None:
            self.refresh()
            entry = self.entries.get(study_id)
        if entry is None:
            raise NotFoundError(
                f"study {study_id!r} not found; available: {', '.join(sorted(self.entries)) or '(none)'}"
            )
        return entry

    # ------------------------------------------------------------------------------------ reading

    def open_readonly(self, entry: StudyEntry) -> Catalog:
        path = entry.catalog_path()
        if not path.exists():
            raise NotFoundError(f"study {entry.id!r} has no catalog yet; start a run first")
        return Catalog.open(path, readonly=True)

    def scheme(self, entry: StudyEntry, catalog: Catalog | None) -> tuple[tuple[str, ...], list[str]]:
        """(outcome classes, axis names) from the study file, else from the TOML the catalog holds."""
        text: str | None = None
        path: Path = entry.study_file or entry.catalog_path()
        if entry.study_file is not None:
            text = entry.study_file.read_text(encoding="utf-8")
        elif catalog is not None:
            text = _catalog_toml(catalog)
        if text is None:
            return DEFAULT_CLASSES, []
        try:
            study = parse_study(text, path)
            return label_scheme(study).classes, [axis.name for axis in study.axes]
        except StudyError as error:
            log.warning("study %s: %s", entry.id, error)
            return DEFAULT_CLASSES, []

    def summary(self, entry: StudyEntry) -> dict[str, Any]:
        images = jobs = labeled = 0
        name = entry.id
        catalog: Catalog | None = None
        if entry.catalog_path().exists():
            catalog = Catalog.open(entry.catalog_path(), readonly=True)
            if not _has_images_table(catalog):
                # A run that has just started creates the file before its tables: nothing in it yet.
                catalog.close()
                catalog = None
        try:
            classes, axes = self.scheme(entry, catalog)
            if catalog is not None:
                db = catalog._db
                images = int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
                jobs = int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
                labeled = human_labeled(catalog)
                row = db.execute("SELECT name FROM study ORDER BY id DESC LIMIT 1").fetchone()
                if row:
                    name = row[0]
            elif entry.study_file is not None:
                name = _study_name(entry.study_file) or name
        finally:
            if catalog is not None:
                catalog.close()
        return {
            "id": entry.id,
            "name": name,
            "study_file": str(entry.study_file) if entry.study_file else None,
            "catalog": str(entry.catalog_path()) if entry.catalog_path().exists() else None,
            "images": images,
            "jobs": jobs,
            "labeled": labeled,
            "classes": list(classes),
            "axes": axes,
            "running": self.is_running(entry.id),
        }

    def image_file(self, entry: StudyEntry, image_id: int) -> Path:
        with self.open_readonly(entry) as catalog:
            row = catalog._db.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()
            folder = catalog.images_dir
            base = catalog.path.parent
        if row is None:
            raise NotFoundError(f"study {entry.id!r} has no image {image_id}")
        # Catalog paths are relative to the catalog's folder; the file must be in its image folder.
        path = (base / row[0]).resolve()
        if not path.is_relative_to(folder.resolve()) or not path.is_file():
            raise NotFoundError(f"image {image_id}: its file is missing from {folder}")
        return path

    def explanation_file(self, entry: StudyEntry, image_id: int) -> tuple[Path, Path]:
        """The image's file and where its explanation lives (``NAME.explain.npz`` beside it, which
        may not exist): only images of the catalog, only inside its image folder."""
        image = self.image_file(entry, image_id)
        return image, explanation_path(image)

    # ------------------------------------------------------------------------------------ reports

    def report_dir(self, entry: StudyEntry) -> Path:
        return entry.catalog_path().parent / "report"

    def study_of(self, entry: StudyEntry) -> Study:
        """The study as the lab reads it: its file, else the TOML its catalog recorded."""
        if entry.study_file is not None:
            return load_study(entry.study_file)
        with self.open_readonly(entry) as catalog:
            text = _catalog_toml(catalog)
        if text is None:
            raise StudyError(f"study {entry.id!r}: its catalog records no study file; no report can be made")
        return parse_study(text, entry.catalog_path().with_name("study.toml"))

    def report_fingerprint(self, entry: StudyEntry, study: Study) -> str:
        """A hash of everything a report is made from (see the module docstring)."""
        with self.open_readonly(entry) as catalog:
            images = [(row["id"], row["sha256"], row["axis_values"]) for row in catalog.images()]
            measures = sorted((k, sorted(v.items())) for k, v in catalog.all_measures().items())
            labels = sorted((k, sorted(v.items())) for k, v in catalog.all_labels().items())
        payload = [__version__, study.toml_text, images, measures, labels]
        text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def report(self, entry: StudyEntry, *, rebuild: bool = False) -> dict[str, Any]:
        """The study's report stamp ({fingerprint, generated, built, figures, files}), building the
        report first when it is missing, out of date, or ``rebuild`` is asked for."""
        with self._lock:
            lock = self._report_locks.setdefault(entry.id, threading.Lock())
        with lock:
            study = self.study_of(entry)
            fingerprint = self.report_fingerprint(entry, study)
            out = self.report_dir(entry)
            stamp = _read_stamp(out / REPORT_STAMP)
            current = (
                stamp is not None
                and stamp.get("fingerprint") == fingerprint
                and all((out / "figures" / name).is_file() for name in stamp.get("figures", []))
                and all((out / name).is_file() for name in stamp.get("files", []))
            )
            if current and not rebuild:
                assert stamp is not None
                return {**stamp, "built": False}
            with self._build_lock:
                try:
                    result = build_report(study, catalog_path=entry.catalog_path(), out_dir=out)
                except ModuleNotFoundError as error:
                    # The report imports matplotlib (the lab extra) only when it draws a figure.
                    missing = (error.name or "").partition(".")[0]
                    if missing != "matplotlib":
                        raise
                    raise ReportUnavailableError(
                        f"study reports need the lab extras ({missing} is missing): "
                        "pip install 'voidprompt[lab]'"
                    ) from None
            figures_dir = out / "figures"
            files = [result.html, *result.csvs, *([result.parquet] if result.parquet else [])]
            stamp = {
                "fingerprint": fingerprint,
                "generated": datetime.now(UTC).isoformat(timespec="seconds"),
                "figures": [p.name for p in result.figures if p.parent == figures_dir],
                "files": [p.name for p in files if p.parent == out],
            }
            _write_stamp(out / REPORT_STAMP, stamp)
            return {**stamp, "built": True}

    def report_file(self, entry: StudyEntry, name: str, *, figure: bool) -> Path:
        """A file of the study's report folder (``figure``: of its figures folder), by name."""
        out = self.report_dir(entry)
        folder = out / "figures" if figure else out
        where = "report figure" if figure else "report file"
        try:
            listing = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
        except OSError:
            listing = {}
        path = listing.get(name)
        if path is None or not path.resolve().is_relative_to(folder.resolve()):
            raise NotFoundError(
                f"study {entry.id!r} has no {where} {name!r}; GET /voidprompt/v1/studies/{entry.id}/report "
                "lists them (and builds the report)"
            )
        return path

    # ------------------------------------------------------------------------------------ writing

    def set_label(
        self, entry: StudyEntry, image_id: int, label_class: str | None, tags: list[str], source: str
    ) -> None:
        classes, _axes = self.scheme(entry, None) if entry.study_file else (None, None)
        with self.open_readonly(entry) as reader:
            if classes is None:
                classes, _axes = self.scheme(entry, reader)
            exists = reader._db.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone()
        if not exists:
            raise NotFoundError(f"study {entry.id!r} has no image {image_id}")
        if label_class is not None and label_class not in classes:
            raise StudyError(
                f"label_class={label_class!r}: choose one of {', '.join(classes)} (or null to clear)"
            )
        with disk_full_stops(entry.catalog_path(), retry="set the label again"):
            try:
                catalog = Catalog.open(entry.catalog_path())
            except StudyError as error:
                raise CatalogBusyError(str(error)) from None
            with catalog:
                catalog.set_label(image_id, label_class, tags, source=source)

    def new_study_path(self, name: str) -> Path:
        """Where a study designed over HTTP is saved: ``NAME.toml`` at the top of the studies folder."""
        if self.folder is None:
            raise StudyError("this server has no studies folder; start it with --studies-dir DIR")
        if not STUDY_NAME.fullmatch(name):
            raise StudyError(
                f"name={name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit, e.g. cfg-sweep"
            )
        return self.folder / f"{name}.toml"

    def save_study(self, name: str, text: str, *, overwrite: bool) -> StudyEntry:
        """Write a (checked) study file atomically; an existing one only with ``overwrite``, and never
        while its study runs."""
        path = self.new_study_path(name)
        study_id = _make_id(path, self.folder) if self.folder is not None else name
        if self.is_running(study_id):
            raise CatalogBusyError(f"study {study_id!r} is running; stop it before replacing its file")
        try:
            atomic_write_text(path, text, overwrite=overwrite)
        except FileExistsError:
            raise CatalogBusyError(
                f"{path.name} exists in the studies folder; choose another name or pass overwrite=true"
            ) from None
        self.refresh()
        return self.get(study_id)

    # --------------------------------------------------------------------------------------- runs

    def is_running(self, study_id: str) -> bool:
        handle = self.runs.get(study_id)
        return handle is not None and handle.process.poll() is None

    def start_run(self, entry: StudyEntry, *, max_jobs: int | None, batch_size: int | None) -> RunHandle:
        if entry.study_file is None:
            raise StudyError(f"study {entry.id!r} has only a catalog; a run needs its study file (.toml)")
        with self._lock:
            if self.is_running(entry.id):
                raise CatalogBusyError(f"study {entry.id!r} is already running")
            argv = [sys.executable, "-c", _RUN_CHILD, "run", str(entry.study_file), "--no-progress"]
            argv += self.run_args
            if max_jobs is not None:
                argv += ["--max-jobs", str(max_jobs)]
            if batch_size is not None:
                argv += ["--batch-size", str(batch_size)]
            process = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                # Its own session: a Ctrl-C at the server's terminal stops the server, whose shutdown
                # then stops the run once (stop_all), instead of the terminal interrupting both.
                start_new_session=True,
            )
            handle = RunHandle(process)
            handle.reader = threading.Thread(target=_pump, args=(process.stdout, handle.log), daemon=True)
            handle.reader.start()
            self.runs[entry.id] = handle
            return handle

    def stop_run(self, entry: StudyEntry, timeout: float = 10.0) -> RunHandle | None:
        handle = self.runs.get(entry.id)
        if handle is None or handle.process.poll() is not None:
            return handle
        # SIGINT first: the runner commits each image in its own transaction, so it can stop anywhere.
        # Sent again every INTERRUPT_REPEAT_S: an interrupt taken by code that catches everything (a
        # library's catch-all handler) would otherwise be lost, and a second one costs nothing.
        code: int | None = None
        deadline = time.monotonic() + timeout
        while code is None and time.monotonic() < deadline:
            handle.process.send_signal(signal.SIGINT)
            try:
                code = handle.process.wait(min(INTERRUPT_REPEAT_S, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                continue
        how = "stopped"
        if code is None:
            handle.process.terminate()
            code = handle.process.wait(timeout)
            how = f"did not stop within {timeout:g} s of SIGINT and was terminated"
        if handle.reader is not None:
            # Its last lines are in the pipe still; a worker process it left behind may hold the
            # pipe open, hence the bound.
            handle.reader.join(2.0)
        log.info(
            "study %s: run %s (exit code %s); its finished images are kept, run it again to resume",
            entry.id,
            how,
            code,
        )
        return handle

    def stop_all(self) -> None:
        for study_id in list(self.runs):
            entry = self.entries.get(study_id)
            if entry is not None:
                self.stop_run(entry, timeout=5.0)


# The child of a study run: `voidprompt study run ...`, whose command line answers an interrupt
# with one line and exit code 130. An interrupt that lands while it is still importing gets the same.
_RUN_CHILD = """\
import signal, sys
# The server stops a run with SIGINT, whatever this process inherited: a server started in the
# background of a non-interactive shell passes SIGINT on ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
try:
    from voidprompt.cli import main
    code = main(["study", *sys.argv[1:]])
except KeyboardInterrupt:
    print("voidprompt: interrupted", file=sys.stderr)
    code = 130
# The run has answered: the server's repeated SIGINT (every INTERRUPT_REPEAT_S) must not kill the
# interpreter's shutdown, which takes over a second with torch loaded on a busy machine.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(code)
"""


def _pump(stream: IO[str] | None, sink: deque[str]) -> None:
    if stream is None:
        return
    for line in stream:
        sink.append(line.rstrip("\n"))


def _catalog_toml(catalog: Catalog) -> str | None:
    row = catalog._db.execute("SELECT toml FROM study ORDER BY id DESC LIMIT 1").fetchone()
    return str(row[0]) if row else None


def _has_images_table(catalog: Catalog) -> bool:
    row = catalog._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'images'")
    return row.fetchone() is not None


def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    for key in ("figures", "files"):
        names = data.get(key)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return None
    return data


def _write_stamp(path: Path, stamp: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(stamp, indent=1))


def image_count(catalog_path: Path) -> int:
    """How many of its jobs a catalog has a picture of (0 before the run has made its tables)."""
    if not catalog_path.exists():
        return 0
    with Catalog.open(catalog_path, readonly=True) as catalog:
        if not _has_images_table(catalog):
            return 0
        return int(catalog._db.execute("SELECT COUNT(DISTINCT job_id) FROM images").fetchone()[0])


def human_labeled(catalog: Catalog) -> int:
    row = catalog._db.execute(
        "SELECT COUNT(DISTINCT image_id) FROM labels WHERE source = ? AND label_class IS NOT NULL", (HUMAN,)
    ).fetchone()
    return int(row[0])


def image_record(
    row: dict[str, Any], labels: dict[str, tuple[str | None, list[str]]], url: str
) -> dict[str, Any]:
    label, source = effective_label(labels)
    return {
        "id": row["id"],
        "job_id": row["job_id"],
        "url": url,
        "seed": row["seed"],
        "width": row["width"],
        "height": row["height"],
        "axis_values": row["axis_values"],
        "labels": {s: {"label_class": c, "tags": t} for s, (c, t) in labels.items()},
        "label": label,
        "label_source": source,
    }


def _make_id(path: Path, folder: Path) -> str:
    relative = path.relative_to(folder).with_suffix("").as_posix()
    return relative.replace("/", "~")


def _is_study_file(path: Path) -> bool:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data.get("study"), dict)


def _study_name(path: Path) -> str | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        name = data["study"].get("name")
        return str(name) if name else None
    except (OSError, tomllib.TOMLDecodeError, KeyError, AttributeError):
        return None

"""Writing a file so that nothing half-written survives a crash: temporary file, fsync, rename.

Every file voidprompt writes for a reader to find later (models, state files, images, catalogs'
exports, reports, caches) goes through :func:`atomic_write` or :class:`PendingFile`:

1. the content goes to a temporary file beside the target (same directory, so the rename below
   stays on one filesystem), named ``.partial-<pid>-<host>-<random>-<name>.tmp`` (the writer's
   process id, 8 hex digits of a hash of the host name, 8 random hex digits): the lab's catalog
   sweep removes such files after a crash, :func:`sweep_stale_partials` removes those of dead
   writers, and folder scans that look for ``.safetensors`` or ``.png`` files (checkpoint, LoRA and
   VAE lists) never see one half-written;
2. the temporary file is flushed and fsynced, so the rename can never publish an empty or partial
   file after a power cut;
3. it is renamed over the target (``os.replace``, atomic on POSIX and Windows), or, when the
   target must not be replaced, hard-linked to it (which fails if the target exists);
4. the directory is fsynced where the OS allows it (POSIX), so the rename itself is durable.

If anything fails before step 3, the temporary file is removed and the target keeps its old
content (or stays absent). Removing it never writes: a handle opened through
:meth:`PendingFile.open` is closed without caring whether its last buffered bytes reach the disk
(on a full disk that flush fails again, and the temporary file must go all the same).

A writer killed outright (``kill -9``, power cut) cannot remove its temporary file. Writers of
big files (the merger, LoRA extraction) call :func:`sweep_stale_partials` on their output folder
first. A temporary file is stale when its name matches the pattern above exactly, its host part is
this host's, and no process with its pid is alive (a pid reused since keeps the file: the safe
side). Files of other hosts (a folder shared over the network), of other naming, or on systems
without a cheap liveness check (Windows, where signal 0 would terminate the process) are left alone.

Permissions: a new file gets ``0o666`` less the process umask, as ``open(path, "w")`` would give
(``tempfile.mkstemp`` gives 0600, and so does safetensors' writer, which replaces the file it is
given: the mode is set again after the content is written).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

__all__ = [
    "TEMP_PREFIX",
    "PendingFile",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "sweep_stale_partials",
    "temp_path_for",
]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".partial-"
# O_EXCL: never reuse a name another writer holds; O_BINARY: no newline translation on Windows.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
# fsync needs a writable handle on Windows (FlushFileBuffers); a read-only one suffices on POSIX and
# works whatever the file's mode.
_SYNC = os.O_RDONLY if os.name == "posix" else os.O_RDWR


# .partial-<pid>-<host>-<random>-<name>.tmp, nothing else.
_TEMP_NAME = re.compile(r"\.partial-([1-9][0-9]{0,9})-([0-9a-f]{8})-[0-9a-f]{8}-.+\.tmp", re.DOTALL)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def temp_path_for(target: Path) -> Path:
    """A fresh temporary name beside ``target``, starting with :data:`TEMP_PREFIX` (see the module
    docstring for the pattern)."""
    stem = f"{TEMP_PREFIX}{os.getpid()}-{_host_tag()}-{secrets.token_hex(4)}"
    return target.with_name(f"{stem}-{target.name}.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no liveness check without side effects: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def sweep_stale_partials(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of dead writers of this host in ``folder`` (not its subfolders);
    returns what was removed. See the module docstring for what counts as stale."""
    removed: list[Path] = []
    host = _host_tag()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match is None or match.group(2) != host:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except OSError as error:
            log.warning("%s: a stale temporary file that could not be removed: %s", entry.path, error)
            continue
        log.info("removed %s, left by a writer that ended without finishing (pid %d)", entry.path, pid)
        removed.append(Path(entry.path))
    return removed


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # Windows: a directory cannot be opened; its renames are durable with the file
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network mounts) refuse fsync on a directory; the file is synced
    finally:
        os.close(fd)


class PendingFile:
    """A temporary file beside ``target`` that becomes ``target`` on :meth:`commit`.

    For writers that stream over time (the safetensors stream writer); :func:`atomic_write` is the
    one-call form. As a context manager it discards the temporary file unless committed.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        while True:
            self.temp = temp_path_for(self.target)
            try:
                fd = os.open(self.temp, _CREATE, 0o666)  # the kernel takes the umask off 0o666
            except FileExistsError:
                continue
            break
        try:
            self._mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what open(path, "w") would have given
        finally:
            os.close(fd)
        self._done = False
        self._handle: BinaryIO | None = None

    def open(self) -> BinaryIO:
        """The temporary file opened for binary writing; :meth:`commit` closes it (a failed flush
        there is an error), :meth:`discard` closes it ignoring a failed flush."""
        if self._handle is not None:
            raise ValueError(f"{self.temp}: already open")
        self._handle = open(self.temp, "wb")  # noqa: SIM115 - commit() or discard() closes it
        return self._handle

    def commit(self, *, overwrite: bool = True) -> Path:
        """Sync the temporary file and move it to ``target``; returns ``target``.

        ``overwrite=False`` raises FileExistsError (and leaves ``target`` alone) when it exists.
        """
        if self._done:
            raise ValueError(f"{self.target}: this pending file was already committed or discarded")
        try:
            if self._handle is not None:
                self._handle.close()
            os.chmod(self.temp, self._mode)  # a writer may have replaced the file with a 0600 one
            fd = os.open(self.temp, _SYNC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                os.replace(self.temp, self.target)
            else:
                _link_new(self.temp, self.target)
        finally:
            self.discard()
        fsync_directory(self.target.parent)
        return self.target

    def discard(self) -> None:
        """Remove the temporary file (if still there); ``target`` is untouched."""
        self._done = True
        if self._handle is not None:
            # Its buffered bytes are being thrown away: a flush that fails (disk full) must not
            # stop the unlink below.
            with contextlib.suppress(OSError):
                self._handle.close()
        self.temp.unlink(missing_ok=True)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.discard()


def _link_new(temp: Path, target: Path) -> None:
    """Put ``temp`` at ``target`` only if ``target`` does not exist, even against a racing writer."""
    try:
        os.link(temp, target)
    except FileExistsError:
        raise
    except OSError:
        # Filesystems without hard links: check, then rename (a narrow race remains).
        if target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(temp, target)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, overwrite: bool = True
) -> Path:
    """Call ``write(temp)`` to fill a temporary file, then move it to ``path``; returns ``path``.

    ``write`` gets the temporary file's path (it exists, empty) and may open, truncate or replace
    it. Readers of ``path`` see its old content or the new one, never half of it. ``overwrite=False``
    raises FileExistsError when ``path`` exists.
    """
    with PendingFile(path) as pending:
        write(pending.temp)
        return pending.commit(overwrite=overwrite)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True) -> Path:
    return atomic_write(path, lambda temp: temp.write_bytes(data), overwrite=overwrite)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", overwrite: bool = True
) -> Path:
    return atomic_write(path, lambda temp: temp.write_text(text, encoding=encoding), overwrite=overwrite)

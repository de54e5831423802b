"""Writing a file so that nothing half-written survives a crash: temporary file, fsync, rename.

Every file voidprompt writes for a reader to find later (models, state files, images, catalogs'
exports, reports, caches) goes through :func:`atomic_write` or :class:`PendingFile`:

1. the content goes to a temporary file beside the target (same directory, so the rename below
   stays on one filesystem), named ``.partial-<random>-<name>.tmp``: the lab's catalog sweep removes
   such files after a crash, and folder scans that look for ``.safetensors`` or ``.png`` files
   (checkpoint, LoRA and VAE lists) never see one half-written;
2. the temporary file is flushed and fsynced, so the rename can never publish an empty or partial
   file after a power cut;
3. it is renamed over the target (``os.replace``, atomic on POSIX and Windows), or, when the
   target must not be replaced, hard-linked to it (which fails if the target exists);
4. the directory is fsynced where the OS allows it (POSIX), so the rename itself is durable.

If anything fails before step 3, the temporary file is removed and the target keeps its old
content (or stays absent).

Permissions: a new file gets ``0o666`` less the process umask, as ``open(path, "w")`` would give
(``tempfile.mkstemp`` gives 0600, and so does safetensors' writer, which replaces the file it is
given: the mode is set again after the content is written).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = [
    "TEMP_PREFIX",
    "PendingFile",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_directory",
    "temp_path_for",
]

TEMP_PREFIX = ".partial-"
# O_EXCL: never reuse a name another writer holds; O_BINARY: no newline translation on Windows.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
# fsync needs a writable handle on Windows (FlushFileBuffers); a read-only one suffices on POSIX and
# works whatever the file's mode.
_SYNC = os.O_RDONLY if os.name == "posix" else os.O_RDWR


def temp_path_for(target: Path) -> Path:
    """A fresh temporary name beside ``target``, starting with :data:`TEMP_PREFIX`."""
    return target.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}-{target.name}.tmp")


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

    def commit(self, *, overwrite: bool = True) -> Path:
        """Sync the temporary file and move it to ``target``; returns ``target``.

        ``overwrite=False`` raises FileExistsError (and leaves ``target`` alone) when it exists.
        """
        if self._done:
            raise ValueError(f"{self.target}: this pending file was already committed or discarded")
        try:
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

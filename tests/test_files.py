"""The one temp-write-then-rename helper: content, failure, permissions, durability."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from voidprompt import files
from voidprompt.files import TEMP_PREFIX, PendingFile, atomic_write, atomic_write_bytes, atomic_write_text

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and /proc")


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process umask after a test that sets it."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def test_the_content_lands_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    assert atomic_write_bytes(target, b"\x00first") == target
    assert target.read_bytes() == b"\x00first"
    atomic_write_text(target, "second é\n")
    assert target.read_bytes() == "second é\n".encode()
    assert os.listdir(tmp_path) == ["a.bin"]


def test_write_gets_a_temporary_name_beside_the_target(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(temp: Path) -> None:
        seen.append(temp)
        assert temp.exists() and temp.stat().st_size == 0
        temp.write_bytes(b"x")

    atomic_write(tmp_path / "t.png", write)
    (temp,) = seen
    assert temp.parent == tmp_path
    # The catalog's sweep knows the prefix; a folder scan for .png (or .safetensors) skips the suffix.
    assert temp.name.startswith(TEMP_PREFIX) and temp.name.endswith("-t.png.tmp")
    assert not temp.exists()


@pytest.mark.parametrize("existing", [b"old content", None])
def test_a_failing_write_leaves_the_target_as_it_was_and_no_temporary_file(
    tmp_path: Path, existing: bytes | None
) -> None:
    target = tmp_path / "model.safetensors"
    if existing is not None:
        target.write_bytes(existing)

    def write(temp: Path) -> None:
        temp.write_bytes(b"half a mod")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, write)
    assert (target.read_bytes() if target.exists() else None) == existing
    assert sorted(os.listdir(tmp_path)) == ([target.name] if existing is not None else [])


def test_without_overwrite_an_existing_target_is_kept_and_refused(tmp_path: Path) -> None:
    target = tmp_path / "00001-1.png"
    assert atomic_write_bytes(target, b"first", overwrite=False) == target
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", overwrite=False)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == [target.name]


@posix_only
@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_a_new_file_gets_the_mode_open_would_give_under_the_umask(
    tmp_path: Path, umask: None, mask: int, mode: int
) -> None:
    os.umask(mask)
    plain = atomic_write_bytes(tmp_path / "plain", b"x")

    def replace_with_private_file(temp: Path) -> None:
        # What safetensors' save_file does: write its own 0600 file and rename it over the path given.
        other = temp.with_name("private")
        fd = os.open(other, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"y")
        os.close(fd)
        os.chmod(other, 0o600)
        os.replace(other, temp)

    replaced = atomic_write(tmp_path / "replaced", replace_with_private_file)
    assert (plain.stat().st_mode & 0o777, replaced.stat().st_mode & 0o777) == (mode, mode)
    assert replaced.read_bytes() == b"y"


@posix_only
def test_the_file_is_synced_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    target = tmp_path / "state.pt"
    temps: list[Path] = []
    atomic_write(target, lambda temp: (temps.append(temp), temp.write_bytes(b"s")))
    assert events == [("fsync", str(temps[0])), ("replace", str(target)), ("fsync", str(tmp_path))]


def test_a_pending_file_is_discarded_unless_committed(tmp_path: Path) -> None:
    target = tmp_path / "big.safetensors"
    with pytest.raises(ValueError, match="stop"), PendingFile(target) as pending:
        pending.temp.write_bytes(b"part")
        raise ValueError("stop")
    assert os.listdir(tmp_path) == []
    with PendingFile(target) as pending:
        pending.temp.write_bytes(b"whole")
        pending.commit()
        with pytest.raises(ValueError, match="already committed"):
            pending.commit()
    assert target.read_bytes() == b"whole"
    assert os.listdir(tmp_path) == [target.name]

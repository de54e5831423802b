"""Nothing left behind: a full disk during ``lora extract`` / ``merge`` removes the temporary file,
SIGTERM cleans up too, and the temporary files of writers killed outright are swept on the next run
(only voidprompt's own, of this host, whose writer is dead)."""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from voidprompt import files as files_mod
from voidprompt.files import TEMP_PREFIX, PendingFile, sweep_stale_partials, temp_path_for
from voidprompt.models import merge as merge_mod
from voidprompt.models.merge import MergeMethod, MergeOptions, merge_checkpoints
from voidprompt.models.networks.extract import extract_lora
from voidprompt.models.networks_cli import main as cli_main
from voidprompt.testing.fake_checkpoints import tiny_sd1_state_dict, write_tiny_checkpoint


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("models")
    a = write_tiny_checkpoint(folder / "a.safetensors", state_dict=tiny_sd1_state_dict(0))
    b = write_tiny_checkpoint(folder / "b.safetensors", state_dict=tiny_sd1_state_dict(1))
    return a, b


class _Disk(io.RawIOBase):
    """A file on a disk with ``room`` bytes free: writes past it fail with ENOSPC, as a full disk's do."""

    def __init__(self, path: object, room: int) -> None:
        self._raw = io.FileIO(path, "wb")  # type: ignore[arg-type]
        self._room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[no-untyped-def, override]
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._raw.write(data)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _full_disk(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    monkeypatch.setattr(
        files_mod, "open", lambda path, mode: io.BufferedWriter(_Disk(path, room)), raising=False
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX))


def test_extract_on_a_full_disk_leaves_no_partial_file(
    tmp_path: Path, models, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "lora.safetensors"
    _full_disk(monkeypatch, room=20_000)  # the header fits, the tensors do not
    with pytest.raises(OSError) as err:
        extract_lora(*models, out, rank=2)
    assert err.value.errno == errno.ENOSPC
    assert not out.exists() and _leftovers(tmp_path) == []
    # The command says so in one line and exits 1.
    rc = cli_main(["lora", "extract", str(models[0]), str(models[1]), "--rank", "2", "--out", str(out)])
    assert rc == 1
    assert capsys.readouterr().err == (
        f"error: disk full writing {out}; nothing was written. Free space and run again.\n"
    )
    assert not out.exists() and _leftovers(tmp_path) == []


def test_merge_on_a_full_disk_leaves_no_partial_file(
    tmp_path: Path, models, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.safetensors"
    _full_disk(monkeypatch, room=50_000)
    rc = cli_main(["merge", "--a", str(models[0]), "--b", str(models[1]), "--out", str(out)])
    assert rc == 1 and "error: disk full writing" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_sigterm_during_a_merge_removes_the_temporary_file(
    tmp_path: Path, models, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}
    real = merge_mod._combine

    def terminated_midway(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 10:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "_combine", terminated_midway)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["merge", "--a", str(models[0]), "--b", str(models[1]), "--out", str(out)])
    assert exit_.value.code == 128 + signal.SIGTERM and calls["n"] >= 10
    assert not out.exists() and _leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == before


_HOLDER = """
import sys, time
from pathlib import Path
from voidprompt.files import PendingFile
pending = PendingFile(Path(sys.argv[1]))
pending.temp.write_bytes(b"half a model")
print(pending.temp, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(os.name != "posix", reason="the liveness check is POSIX-only")
def test_stale_partials_are_swept_live_and_foreign_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "out.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        live_other = Path(holder.stdout.readline().strip())
        assert live_other.parent == tmp_path and live_other.is_file()
        with PendingFile(target) as mine:  # this process's own, in use
            foreign = tmp_path / f"{TEMP_PREFIX}{holder.pid + 1}-00000000-0123abcd-out.safetensors.tmp"
            foreign.write_bytes(b"another host's")
            unrelated = [tmp_path / f"{TEMP_PREFIX}0123abcd-out.safetensors.tmp", tmp_path / ".partial-x.tmp"]
            for path in unrelated:
                path.write_bytes(b"not ours to judge")
            assert sweep_stale_partials(tmp_path) == []  # every writer is alive
            holder.kill()
            holder.wait()
            assert sweep_stale_partials(tmp_path) == [live_other]
            assert not live_other.exists()
            assert mine.temp.exists() and foreign.exists() and all(p.exists() for p in unrelated)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # a fresh interpreter importing torch: seconds
@pytest.mark.skipif(os.name != "posix", reason="the liveness check is POSIX-only")
def test_a_killed_merge_leaves_a_partial_the_next_merge_sweeps(tmp_path: Path, models) -> None:  # type: ignore[no-untyped-def]
    script = f"""
import os, signal
from voidprompt.models import merge
real = merge._combine
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
merge._combine = killed
merge.merge_checkpoints({str(models[0])!r}, {str(models[1])!r}, out={str(tmp_path / "m.safetensors")!r},
                        options=merge.MergeOptions())
"""
    env = {**os.environ, "VOIDPROMPT_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].endswith("-m.safetensors.tmp")
    result = merge_checkpoints(
        *models, out=tmp_path / "other.safetensors", options=MergeOptions(MergeMethod.WEIGHTED_SUM)
    )
    assert result.path is not None and result.path.exists()
    assert _leftovers(tmp_path) == []


def test_temp_names_carry_the_pid() -> None:
    name = temp_path_for(Path("/x/y.png")).name
    assert name.startswith(f"{TEMP_PREFIX}{os.getpid()}-") and name.endswith("-y.png.tmp")
    assert files_mod._TEMP_NAME.fullmatch(name)

"""Hashes against hashlib on files made here."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from voidprompt.models.hashes import addnet_hash_safetensors, old_model_hash, sha256_file, short_hash


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = bytes((i * 7 + i // 251) % 256 for i in range(size))
    path = tmp_path / "model.ckpt"
    path.write_bytes(data)
    return path, data


def test_old_hash_reads_64k_at_1mib(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 0x100000 + 0x10000 + 123)
    assert old_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert old_model_hash(tmp_path / "absent.ckpt") == "NOFILE"


def test_short_hash_and_cache(tmp_path: Path) -> None:
    path, data = _file(tmp_path, 3 * 1024 * 1024 + 17)  # spans several 1 MiB blocks
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full
    assert short_hash(path) == full[:10]
    cache = json.loads((Path(os.environ["VOIDPROMPT_CACHE_DIR"]) / "hashes.json").read_text())
    assert cache[str(path.resolve())]["sha256"] == full
    # A cached entry is trusted only while size and mtime match: poison it, then touch the file.
    entry = cache[str(path.resolve())]
    entry["sha256"] = "0" * 64
    (Path(os.environ["VOIDPROMPT_CACHE_DIR"]) / "hashes.json").write_text(json.dumps(cache))
    assert sha256_file(path) == "0" * 64  # proves the cache is used
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert sha256_file(path) == full


def test_addnet_hash_skips_header(tmp_path: Path) -> None:
    header = b'{"__metadata__":{"ss_name":"x"}}'
    body = bytes(range(256)) * 5000
    path = tmp_path / "lora.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + body)
    assert addnet_hash_safetensors(path) == hashlib.sha256(body).hexdigest()

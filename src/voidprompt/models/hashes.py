"""File hashes as A1111 shows them in infotexts and model lists.

* :func:`old_model_hash` - the pre-2023 "Model hash" (8 hex): sha256 of the 64 KiB at offset 1 MiB.
* :func:`sha256_file` / :func:`short_hash` - sha256 of the whole file; A1111's current "Model hash"
  and "VAE hash" are its first 10 hex digits. Hashing a 2-7 GB file takes seconds, so results are
  cached by (absolute path, size, mtime_ns) in ``$VOIDPROMPT_CACHE_DIR/hashes.json`` (default
  ``~/.cache/voidprompt/hashes.json``), written atomically (:func:`voidprompt.files.atomic_write`).
* :func:`addnet_hash_safetensors` - sha256 of a ``.safetensors`` file's tensor data (everything after
  the 8-byte length and the JSON header), so editing metadata keeps the hash; A1111 writes its first
  12 hex digits as the LoRA hash in infotexts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from voidprompt.files import atomic_write_text

__all__ = [
    "addnet_hash_safetensors",
    "cache_dir",
    "old_model_hash",
    "sha256_file",
    "short_hash",
]

_BLOCK = 1024 * 1024


def cache_dir() -> Path:
    """``$VOIDPROMPT_CACHE_DIR`` or ``~/.cache/voidprompt``."""
    env = os.environ.get("VOIDPROMPT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "voidprompt"


def old_model_hash(path: str | Path) -> str:
    """A1111's legacy hash; 'NOFILE' when the file does not exist (as A1111 writes it)."""
    try:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    except FileNotFoundError:
        return "NOFILE"


def _hash_stream(path: Path, start: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(file: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}  # a missing or damaged cache only costs a re-hash
    return data if isinstance(data, dict) else {}


def sha256_file(path: str | Path, *, use_cache: bool = True) -> str:
    """Full sha256 (64 hex) of a file, cached by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    if not use_cache:
        return _hash_stream(p)
    cache_file = cache_dir() / "hashes.json"
    cache = _load_cache(cache_file)
    entry = cache.get(str(p))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = _hash_stream(p)
    # Re-read before writing so a concurrent process's entries survive (last writer still wins per key).
    cache = _load_cache(cache_file)
    cache[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps(cache, indent=0, sort_keys=True))
    except OSError:
        pass  # an unwritable cache directory must not stop loading a model
    return digest


def short_hash(path: str | Path, *, use_cache: bool = True) -> str:
    """A1111's current short hash: the first 10 hex digits of the file's sha256."""
    return sha256_file(path, use_cache=use_cache)[:10]


def addnet_hash_safetensors(path: str | Path) -> str:
    """sha256 (64 hex) of a safetensors file after its header; A1111 shows ``[:12]`` for LoRAs."""
    p = Path(path)
    with open(p, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    return _hash_stream(p, 8 + header_len)

"""The extra-network folders: LoRAs, textual-inversion embeddings and hypernetworks on disk.

What ``/sdapi/v1/loras``, ``/embeddings`` and ``/hypernetworks`` list, in A1111's shapes, and what
the server's Engine is given so prompts can use them (``<lora:...>``, ``<hypernet:...>``, embedding
trigger words).

Names are the engine's own list (:mod:`voidprompt.models.networks.names`, which owns the rules: the
file stem; when two files share a stem, a file directly in the folder wins over one in a subfolder,
then the earlier suffix, then sorted path order; links out of the folder are skipped), so the listed
file is the one a prompt tag would load, and a prompt can load nothing this listing does not show.

Reading is metadata only and never runs code from a file:

- LoRA: the ``__metadata__`` of a ``.safetensors`` header (A1111 ``read_metadata_from_safetensors``:
  values that look like JSON objects are decoded); ``.pt`` / ``.ckpt`` LoRAs are not opened at all
  (A1111 shows no metadata for them either).
- Embeddings: the safetensors header (tensor shapes), or a ``.pt`` / ``.bin`` through the restricted
  unpickler of :mod:`voidprompt.models.safe_pickle`, which reads shapes without reading tensor data.
- Hypernetworks: names only (A1111 ``list_hypernetworks``).

Reads are cached by (path, size, mtime), so a rescan re-reads only changed files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt.errors import VoidpromptError
from voidprompt.models.networks.lora import LORA_SUFFIXES
from voidprompt.models.networks.names import HYPERNETWORK, alias_from_metadata, scan_network_folder
from voidprompt.models.safe_pickle import load_pickle_checkpoint
from voidprompt.models.safetensors_stream import read_safetensors_header
from voidprompt.models.tokenizer import ClipTokenizer
from voidprompt.prompts.embeddings import EMBEDDING_SUFFIXES, EmbeddingDatabase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraEntry:
    name: str
    alias: str
    path: Path
    metadata: dict[str, Any]


@dataclass(frozen=True)
class EmbeddingInfo:
    """A1111's ``Embedding`` fields that the API reports (``shape`` is the vector width)."""

    name: str
    path: Path
    shape: int
    vectors: int
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    def api(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
            "shape": self.shape,
            "vectors": self.vectors,
        }


@dataclass(frozen=True)
class HypernetworkEntry:
    name: str
    path: Path


def scan_named_files(
    folder: Path | None, suffixes: Sequence[str], *, ignore_case: bool = False
) -> list[tuple[str, Path]]:
    """``(name, path)`` per name under ``folder``, sorted by name: the list a prompt's network names
    are looked up in (:func:`voidprompt.models.networks.names.scan_network_folder`). Suffixes match
    exactly, as the engine's network lookup does, or in any case with ``ignore_case`` (as its
    embedding loader does)."""
    return list(scan_network_folder(folder, suffixes, ignore_case=ignore_case).items())


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


# ------------------------------------------------------------------------------------------ LoRA


def safetensors_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors header, values that start with ``{`` JSON-decoded
    (A1111's ``read_metadata_from_safetensors``). Only the header is read."""
    out: dict[str, Any] = {}
    for key, value in read_safetensors_header(path).metadata.items():
        out[str(key)] = value
        if isinstance(value, str) and value[:1] == "{":
            with contextlib.suppress(ValueError):
                out[str(key)] = json.loads(value)
    return out


def read_lora_entry(name: str, path: Path) -> LoraEntry:
    metadata: dict[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        try:
            metadata = safetensors_metadata(path)
        except (VoidpromptError, OSError) as error:
            log.warning("LoRA %s: metadata not readable: %s", path, error)
    return LoraEntry(name, alias_from_metadata(name, metadata), path, metadata)


# ------------------------------------------------------------------------------------ embeddings


def _shape_of(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        return None


def embedding_shape(data: Any, source: str) -> tuple[int, int]:
    """(vectors, width) of an embedding file's content, by the layouts the engine accepts
    (:func:`voidprompt.prompts.embeddings.vectors_from_data`) and A1111's SDXL rule (width
    clip_g + clip_l, so it never fits an SD1 model). ``data`` maps keys to tensors or anything with
    a ``shape`` (lazy pickle tensors, safetensors header shapes)."""
    bad = VoidpromptError(f"embedding {source}: unrecognised file layout")
    if not isinstance(data, Mapping):
        raise bad
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise VoidpromptError(f"embedding {source}: string_to_param must hold exactly one tensor")
        shape = _shape_of(next(iter(params.values())))
    elif "clip_l" in data and "clip_g" in data:
        g, small = _shape_of(data["clip_g"]), _shape_of(data["clip_l"])
        if not g or not small:
            raise bad
        return g[0], g[-1] + small[-1]
    elif len(data) == 1:
        shape = _shape_of(next(iter(data.values())))
    else:
        raise bad
    if shape is None:
        raise bad
    if len(shape) == 1:
        shape = (1, *shape)  # a diffusers concept: one vector without the row axis
    if len(shape) != 2 or shape[0] == 0:
        raise VoidpromptError(f"embedding {source}: expected shape (n_vectors, width), got {shape}")
    return shape[0], shape[1]


def _optional_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]


def read_embedding_info(name: str, path: Path) -> EmbeddingInfo:
    """Shape and A1111's training fields of one embedding file, without reading its vectors."""
    extra: Mapping[str, Any] = {}
    if path.suffix.lower() == ".safetensors":
        data: dict[str, Any] = {
            key: _Shape(tuple(entry.shape)) for key, entry in read_safetensors_header(path).tensors.items()
        }
    else:
        # The restricted unpickler: tensors stay lazy (shape only), no class outside its allow-list
        # is ever loaded, so nothing in the file runs.
        with load_pickle_checkpoint(path) as checkpoint:
            obj = checkpoint.obj
        if not isinstance(obj, Mapping):
            raise VoidpromptError(f"embedding {path}: the file holds a {type(obj).__name__}, not a dict")
        data = dict(obj)
        extra = obj
    vectors, width = embedding_shape(data, str(path))
    return EmbeddingInfo(
        name=name,
        path=path,
        shape=width,
        vectors=vectors,
        step=_optional_int(extra.get("step")),
        sd_checkpoint=_optional_str(extra.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(extra.get("sd_checkpoint_name")),
    )


# ---------------------------------------------------------------------------------------- folders


@dataclass
class NetworkFolders:
    """The three folders, their scanned contents, and a cache of what was read from each file."""

    lora_dir: Path | None = None
    embeddings_dir: Path | None = None
    hypernetwork_dir: Path | None = None
    loras: list[LoraEntry] = field(default_factory=list)
    embeddings: list[EmbeddingInfo] = field(default_factory=list)
    embedding_paths: list[Path] = field(default_factory=list)  # every embedding file, read or not
    _lora_cache: dict[tuple[str, int, int], LoraEntry] = field(default_factory=dict, repr=False)
    _emb_cache: dict[tuple[str, int, int], EmbeddingInfo | None] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self) -> None:
        self.refresh_loras()
        self.refresh_embeddings()

    def refresh_loras(self) -> None:
        entries: list[LoraEntry] = []
        cache: dict[tuple[str, int, int], LoraEntry] = {}
        for name, path in scan_named_files(self.lora_dir, LORA_SUFFIXES):
            try:
                key = _file_key(path)
            except OSError:
                continue
            entry = self._lora_cache.get(key)
            if entry is None or entry.name != name:
                entry = read_lora_entry(name, path)
            cache[key] = entry
            entries.append(entry)
        with self._lock:
            self.loras = entries
            self._lora_cache = cache

    def refresh_embeddings(self) -> None:
        infos: list[EmbeddingInfo] = []
        paths: list[Path] = []
        cache: dict[tuple[str, int, int], EmbeddingInfo | None] = {}
        for name, path in scan_named_files(self.embeddings_dir, EMBEDDING_SUFFIXES, ignore_case=True):
            try:
                key = _file_key(path)
            except OSError:
                continue
            paths.append(path)
            if key in self._emb_cache:
                info = self._emb_cache[key]
            else:
                try:
                    info = read_embedding_info(name, path)
                except Exception as error:  # a damaged or hostile file must not hide the others
                    # A1111 logs unreadable embeddings and lists them nowhere; so does this.
                    log.warning("embedding %s not listed: %s", path, error)
                    info = None
            cache[key] = info
            if info is not None:
                infos.append(info)
        with self._lock:
            self.embeddings = infos
            self.embedding_paths = paths
            self._emb_cache = cache

    def embeddings_by_fit(
        self, width: int | None
    ) -> tuple[dict[str, EmbeddingInfo], dict[str, EmbeddingInfo]]:
        """(loaded, skipped): loaded are those whose width is the text encoder's (all of them
        when the width is unknown, as A1111 with no model)."""
        loaded: dict[str, EmbeddingInfo] = {}
        skipped: dict[str, EmbeddingInfo] = {}
        for info in self.embeddings:
            (loaded if width is None or info.shape == width else skipped)[info.name] = info
        return loaded, skipped

    def hypernetworks(self) -> list[HypernetworkEntry]:
        """Scanned on every call: names only, nothing is read (A1111 hides one named "None")."""
        listed = scan_network_folder(self.hypernetwork_dir, HYPERNETWORK.suffixes, hidden=HYPERNETWORK.hidden)
        return [HypernetworkEntry(name, path) for name, path in listed.items()]

    def embedding_database(
        self, tokenizer: ClipTokenizer, width: int, sdxl_part: str | None = None
    ) -> EmbeddingDatabase:
        """An :class:`EmbeddingDatabase` of every scanned embedding file for a text encoder of
        ``width`` (wrong widths become its skipped entries, which name the reason when used);
        ``sdxl_part`` (``"clip_l"`` / ``"clip_g"``) picks that tensor of SDXL's pair files."""
        database = EmbeddingDatabase(tokenizer, width=width, sdxl_part=sdxl_part)
        with self._lock:
            paths = list(self.embedding_paths)
        for path in paths:
            database.load_file(path)
        return database

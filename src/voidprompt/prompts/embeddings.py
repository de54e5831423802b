"""Textual-inversion embeddings: loading a folder and finding trigger words in token ids.

Behaviour follows A1111's ``EmbeddingDatabase``: the trigger word is the file stem, it is
tokenized like prompt text and matched by token-id sequence (longest first). Accepted files: A1111
``.pt``/``.bin`` (``string_to_param``), diffusers single-key ``.bin``, ``.safetensors`` (e.g.
EasyNegative's ``emb_params``), and SDXL's ``clip_l`` + ``clip_g`` pairs, each part for its own text
encoder's database (``EmbeddingDatabase(sdxl_part=...)``). Files whose vector width does not fit
the text encoder are skipped at load with a warning; unlike A1111 (which silently treats them as
text) using one raises PromptError, because a silently ignored negative embedding would corrupt a
study.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from voidprompt.errors import PromptError
from voidprompt.models.safe_pickle import LazyTensor, load_pickle_checkpoint
from voidprompt.models.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
SHORTHASH_LEN = 12


@dataclass(frozen=True, eq=False)
class Embedding:
    """One textual-inversion embedding: ``vectors`` is (n_vectors, width), float32 on CPU."""

    name: str
    vectors: torch.Tensor
    sha256: str = ""
    path: Path | None = None

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def shorthash(self) -> str:
        """First 12 hex digits of the file's sha256, as A1111 writes in ``TI hashes``."""
        return self.sha256[:SHORTHASH_LEN]


@dataclass(frozen=True)
class SkippedEmbedding:
    """A file that was found but cannot be used; ``reason`` is shown when its name is used."""

    name: str
    path: Path
    reason: str


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_raw(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    # Never plain pickle: the project's restricted unpickler executes nothing the file asks for.
    with load_pickle_checkpoint(path) as ckpt:
        return _materialize(ckpt, ckpt.obj)


def _materialize(ckpt: Any, obj: Any) -> Any:
    """Read every lazy tensor in a nested dict/list (embedding files are tiny)."""
    if isinstance(obj, LazyTensor):
        return ckpt.materialize(obj)
    if isinstance(obj, Mapping):
        return {k: _materialize(ckpt, v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(ckpt, v) for v in obj)
    return obj


SDXL_PARTS = ("clip_l", "clip_g")


def check_sdxl_part(sdxl_part: str | None) -> None:
    if sdxl_part is not None and sdxl_part not in SDXL_PARTS:
        raise PromptError(f"unknown SDXL embedding part {sdxl_part!r}; use 'clip_l' or 'clip_g'")


def vectors_from_data(data: Any, source: str, sdxl_part: str | None = None) -> torch.Tensor:
    """Extract the (n, width) tensor from a loaded embedding file, in A1111's format order.

    ``sdxl_part`` (``"clip_l"`` or ``"clip_g"``) asks for that tensor of an SDXL pair file, for one of
    SDXL's two text encoders; such a database refuses single-tensor files (A1111 skips them on SDXL:
    their width never equals clip_l's + clip_g's). Raises PromptError naming ``source`` when the
    layout is not one A1111 accepts or belongs to the other family.
    """
    check_sdxl_part(sdxl_part)
    is_pair = isinstance(data, Mapping) and "clip_l" in data and "clip_g" in data
    if sdxl_part is not None:
        if not is_pair:
            raise PromptError(
                f"embedding {source} is not an SDXL embedding (no clip_l + clip_g tensors); an SDXL "
                "model cannot use it"
            )
        parts = {k: _as_vectors(data[k], f"{source} ({k})") for k in SDXL_PARTS}
        rows = {k: int(v.shape[0]) for k, v in parts.items()}
        if rows["clip_l"] != rows["clip_g"]:
            # A1111 places clip_g's count of placeholders in both encoders' chunks; refuse instead.
            raise PromptError(
                f"embedding {source}: clip_l has {rows['clip_l']} vectors but clip_g {rows['clip_g']}; "
                "an SDXL embedding needs the same count in both"
            )
        return parts[sdxl_part]
    if isinstance(data, Mapping) and "string_to_param" in data:
        params = data["string_to_param"]
        # Files saved by torch 1.11 hold a ParameterDict; its tensors live in ``_parameters``.
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise PromptError(f"embedding {source}: string_to_param must hold exactly one tensor")
        tensor = next(iter(params.values()))
    elif is_pair:
        raise PromptError(f"embedding {source} is an SDXL embedding (clip_l + clip_g); SD1 cannot use it")
    elif isinstance(data, Mapping) and data and isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            raise PromptError(
                f"embedding {source} holds {len(data)} tensors ({', '.join(map(str, data))}); "
                "expected a single-key embedding"
            )
        tensor = next(iter(data.values()))
    else:
        raise PromptError(f"embedding {source}: unrecognised file layout (no string_to_param, no tensor)")
    return _as_vectors(tensor, source)


def _as_vectors(tensor: Any, source: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise PromptError(f"embedding {source}: expected a tensor, found {type(tensor).__name__}")
    vec = tensor.detach().to(device="cpu", dtype=torch.float32)
    if vec.dim() == 1:
        vec = vec.unsqueeze(0)  # diffusers concepts store one vector without the row axis
    if vec.dim() != 2 or vec.shape[0] == 0:
        raise PromptError(f"embedding {source}: expected shape (n_vectors, width), got {tuple(vec.shape)}")
    return vec.contiguous()


@dataclass
class EmbeddingDatabase:
    """Embeddings known to one text encoder, looked up by the token ids of their trigger words."""

    tokenizer: ClipTokenizer
    width: int = 768
    # SDXL: which tensor of a clip_l + clip_g file this text encoder takes; None for SD1.
    sdxl_part: str | None = None
    embeddings: dict[str, Embedding] = field(default_factory=dict)
    skipped: dict[str, SkippedEmbedding] = field(default_factory=dict)
    # first token id -> [(ids, name)] sorted longest first, for A1111's longest-match lookup.
    _lookup: dict[int, list[tuple[tuple[int, ...], str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_sdxl_part(self.sdxl_part)

    def _register_ids(self, name: str) -> None:
        ids = tuple(self.tokenizer.encode(name))
        if not ids:
            return
        entries = [e for e in self._lookup.get(ids[0], []) if e[1] != name]
        entries.append((ids, name))
        entries.sort(key=lambda e: len(e[0]), reverse=True)
        self._lookup[ids[0]] = entries

    def add(self, embedding: Embedding) -> None:
        """Register ``embedding``; a wrong width becomes a skipped entry with a warning."""
        if embedding.width != self.width:
            reason = (
                f"embedding {embedding.name!r} ({embedding.path or 'in memory'}) has vectors of width "
                f"{embedding.width} but this text encoder needs {self.width}; it is for another model family"
            )
            log.warning("skipping %s", reason)
            self.add_skipped(SkippedEmbedding(embedding.name, embedding.path or Path(embedding.name), reason))
            return
        self.skipped.pop(embedding.name, None)
        self.embeddings[embedding.name] = embedding
        self._register_ids(embedding.name)

    def add_skipped(self, skipped: SkippedEmbedding) -> None:
        self.embeddings.pop(skipped.name, None)
        self.skipped[skipped.name] = skipped
        self._register_ids(skipped.name)

    def load_file(self, path: str | Path) -> Embedding | None:
        """Load one embedding file; returns None (with a warning) when it is skipped."""
        p = Path(path)
        name = p.stem
        try:
            data = _load_raw(p)
            vectors = vectors_from_data(data, str(p), self.sdxl_part)
        except PromptError as exc:
            log.warning("skipping embedding: %s", exc)
            self.add_skipped(SkippedEmbedding(name, p, str(exc)))
            return None
        except Exception as exc:  # a corrupt file must not stop the others from loading
            reason = f"embedding {p} could not be read: {type(exc).__name__}: {exc}"
            log.warning("skipping %s", reason)
            self.add_skipped(SkippedEmbedding(name, p, reason))
            return None
        emb = Embedding(name=name, vectors=vectors, sha256=file_sha256(p), path=p)
        self.add(emb)
        return emb if name in self.embeddings else None

    def load_folder(self, folder: str | Path) -> list[Embedding]:
        """Load every embedding file under ``folder`` (recursively, sorted paths).

        Two files with the same stem: the first in sorted path order wins, the other is logged.
        """
        root = Path(folder)
        if not root.is_dir():
            raise PromptError(f"embeddings folder {root} does not exist or is not a folder")
        paths = sorted(
            Path(dirpath) / f
            for dirpath, _dirs, files in os.walk(root, followlinks=True)
            for f in files
            if Path(f).suffix.lower() in EMBEDDING_SUFFIXES
        )
        loaded: list[Embedding] = []
        for p in paths:
            if p.stem in self.embeddings or p.stem in self.skipped:
                log.warning("embedding %s ignored: the name %r is already taken", p, p.stem)
                continue
            emb = self.load_file(p)
            if emb is not None:
                loaded.append(emb)
        return loaded

    def find_at(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose trigger ids start at ``tokens[position]`` and its length in tokens.

        Longest trigger first, as A1111. Raises PromptError when the match is a skipped file.
        """
        for ids, name in self._lookup.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                if name in self.skipped:
                    reason = self.skipped[name].reason
                    raise PromptError(f"the prompt uses embedding {name!r}, which cannot be used: {reason}")
                return self.embeddings[name], len(ids)
        return None

    def signature(self) -> tuple[tuple[str, str, int], ...]:
        """Everything about the database that can change an encoding; part of conditioning cache keys.

        Adding any embedding can change how a prompt tokenizes, so all names count, not just used ones.
        """
        emb = tuple(
            (n, e.sha256 or _tensor_digest(e.vectors), e.n_vectors) for n, e in self.embeddings.items()
        )
        skip = tuple((n, "skipped", 0) for n in self.skipped)
        return tuple(sorted(emb + skip))


def _tensor_digest(t: torch.Tensor) -> str:
    # In-memory embeddings (tests, training) have no file: hash their exact float bytes instead.
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()

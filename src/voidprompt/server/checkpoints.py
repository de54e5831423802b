"""The model folders: checkpoints and VAEs found by scanning, looked up by A1111's aliases.

Each checkpoint's family (SD1, SDXL, ...) and text-encoder width are read from its tensor shapes
(the header only, never the weights) on first use and cached by path, size and modification time.

Names that clients send are only ever looked up in the scanned table, never joined onto a folder,
so a name like ``../../etc/passwd`` cannot reach outside the folders: it is simply not found. Files
reached through a symlink that points outside the folder are skipped when scanning.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from voidprompt.errors import VoidpromptError
from voidprompt.models.arch import clip_prefix_of
from voidprompt.models.arch_sdxl import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX_REFINER
from voidprompt.models.detect import ModelFamily, detect_family
from voidprompt.models.hashes import old_model_hash, sha256_file
from voidprompt.models.load import arch_constants, open_checkpoint

# A1111's checkpoint folder, relative to where the command runs (its --ckpt-dir default).
DEFAULT_CKPT_DIR = Path("models/Stable-diffusion")

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".vae.pt", ".vae.safetensors", ".vae.ckpt", ".pt", ".safetensors", ".ckpt")


class NotFoundError(VoidpromptError):
    """A named model, VAE, study or image does not exist; the message lists what does."""


@dataclass
class CheckpointEntry:
    """One checkpoint file as A1111's ``CheckpointInfo`` presents it."""

    path: Path
    name: str  # path relative to its folder, with the extension (A1111's ``name``)

    @property
    def model_name(self) -> str:
        # A1111: the name without extension, folder separators turned into underscores.
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]

    @property
    def stem(self) -> str:
        return self.path.stem

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @cached_property
    def old_hash(self) -> str:
        return old_model_hash(self.path)

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"

    def aliases(self) -> list[str]:
        """Every string A1111 accepts for this checkpoint (``checkpoint_aliases``)."""
        return [
            self.title,
            self.name,
            os.path.splitext(self.name)[0],
            self.model_name,
            self.shorthash,
            self.sha256,
            self.old_hash,
            f"{self.name} [{self.old_hash}]",
        ]


@dataclass
class VaeEntry:
    path: Path
    name: str  # file name relative to its folder (A1111 shows the file name)

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's tensor shapes say; None where the file could not be read."""

    family: ModelFamily | None
    # The width of a textual-inversion vector the model takes, as A1111 checks it: CLIP's for SD1;
    # for SDXL the sum over its text encoders (CLIP-L + bigG; the refiner: bigG alone), which is the
    # width A1111 gives an SDXL clip_l + clip_g embedding.
    text_width: int | None
    # The picture side the model was trained at (SD1 512, SDXL 1024, the miniature's recorded 128):
    # the web UI's default size for it.
    native_size: int | None = None


def _width(shapes: dict[str, Any], key: str) -> int | None:
    shape = shapes.get(key)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def read_checkpoint_facts(path: Path) -> CheckpointFacts:
    """The family, text width and native size of the checkpoint at ``path``, from its header (or
    lazy pickle)."""
    try:
        with open_checkpoint(path) as reader:
            shapes: dict[str, Any] = dict(reader.shapes)
            family = detect_family(shapes)
            try:
                native: int | None = int(arch_constants(reader, family).vae_sample_size)
            except VoidpromptError as error:  # bad voidprompt.arch metadata: the family still stands
                log.warning("%s: native size unknown: %s", path, error)
                native = None
    except (VoidpromptError, OSError) as error:
        log.warning("%s: model family unknown: %s", path, error)
        return CheckpointFacts(None, None)
    if family.is_sdxl:
        if family is ModelFamily.SDXL_REFINER:
            parts = [OPEN_CLIP_PREFIX_REFINER + "token_embedding.weight"]
        else:
            parts = [
                CLIP_L_PREFIX + "embeddings.token_embedding.weight",
                OPEN_CLIP_PREFIX + "token_embedding.weight",
            ]
        widths = [_width(shapes, key) for key in parts]
        width = None if None in widths else sum(w for w in widths if w is not None)
    else:
        width = _width(shapes, clip_prefix_of(shapes) + "embeddings.token_embedding.weight")
    return CheckpointFacts(family, width, native)


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _scan(folder: Path, suffixes: Sequence[str]) -> list[tuple[Path, str]]:
    if not folder.is_dir():
        return []
    found: list[tuple[Path, str]] = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or not path.name.lower().endswith(tuple(suffixes)):
            continue
        if not _inside(path, folder):
            log.warning("%s: a link out of %s; skipped", path, folder)
            continue
        found.append((path, path.relative_to(folder).as_posix()))
    return found


@dataclass
class ModelRegistry:
    """Checkpoints from ``folders`` plus ``extra_files`` (the miniature model), and VAEs."""

    folders: Sequence[Path]
    extra_files: Sequence[Path] = ()
    vae_folders: Sequence[Path] = ()
    checkpoints: list[CheckpointEntry] = field(default_factory=list)
    vaes: list[VaeEntry] = field(default_factory=list)
    _facts: dict[tuple[str, int, int], CheckpointFacts] = field(default_factory=dict, repr=False)

    def facts(self, entry: CheckpointEntry) -> CheckpointFacts:
        """``entry``'s family and text width, read once per file version (path, size, mtime)."""
        try:
            stat = entry.path.stat()
        except OSError:
            return CheckpointFacts(None, None)
        key = (str(entry.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._facts:
            self._facts[key] = read_checkpoint_facts(entry.path)
        return self._facts[key]

    def refresh(self) -> None:
        entries: list[CheckpointEntry] = []
        seen: set[Path] = set()
        for folder in self.folders:
            for path, name in _scan(folder, CHECKPOINT_SUFFIXES):
                if path.name.lower().endswith(VAE_SUFFIXES[:3]):
                    continue  # a paired VAE next to its checkpoint, not a checkpoint
                entries.append(CheckpointEntry(path, name))
                seen.add(path.resolve())
        for path in self.extra_files:
            if path.is_file() and path.resolve() not in seen:
                entries.append(CheckpointEntry(path, path.name))
        self.checkpoints = entries
        vaes: list[VaeEntry] = []
        for folder in self.vae_folders:
            vaes.extend(VaeEntry(path, name) for path, name in _scan(folder, VAE_SUFFIXES))
        self.vaes = vaes

    def refresh_vaes(self) -> None:
        vaes: list[VaeEntry] = []
        for folder in self.vae_folders:
            vaes.extend(VaeEntry(path, name) for path, name in _scan(folder, VAE_SUFFIXES))
        self.vaes = vaes

    def find(self, name: str) -> CheckpointEntry:
        """A checkpoint by any of A1111's aliases (title, file name, name without extension, hashes)."""
        wanted = name.strip()
        # Cheap aliases first: hashing every file to match a plain name would be slow on big folders.
        for entry in self.checkpoints:
            if wanted in (entry.name, os.path.splitext(entry.name)[0], entry.model_name):
                return entry
        for entry in self.checkpoints:
            if wanted in entry.aliases():
                return entry
        raise NotFoundError(
            f"model {name!r} not found; available: {_choices(e.title for e in self.checkpoints)}"
        )

    def find_vae(self, name: str) -> VaeEntry | None:
        """A VAE by file name; "Automatic" and "None" mean no external VAE (None)."""
        if name in ("Automatic", "None", ""):
            return None
        for entry in self.vaes:
            if name in (entry.name, Path(entry.name).name):
                return entry
        raise NotFoundError(
            f"VAE {name!r} not found; available: "
            f"{_choices(['Automatic', 'None', *(e.name for e in self.vaes)])}"
        )


def _choices(items: Iterable[str]) -> str:
    values = list(items)
    return ", ".join(repr(v) for v in values) if values else "(none: put checkpoints in --ckpt-dir)"

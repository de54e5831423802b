"""How a network name from a prompt (``<lora:NAME:...>``, ``<hypernet:NAME:...>``) finds its file.

A name is looked up in the list of the configured folder, as A1111 looks it up in its
``available_networks`` / ``available_network_aliases`` dictionaries; it is never joined to the folder
as a path. So ``<lora:../../x:1>`` or ``<lora:/abs/path:1>`` is an unknown network, with the same
message whether or not a file exists at that place, and a prompt (over the HTTP API too) can only
ever load a file that the folder lists.

The list (:func:`scan_network_folder`, also what the server's ``/sdapi/v1/loras`` and
``/hypernetworks`` report):

- every file under the folder, subfolders included, whose name ends with one of the kind's suffixes
  (exact case for networks, as the engine always matched them; any case for embeddings); the name
  is the file name without that suffix, matched exactly (case-sensitive, as a Python dict is);
- two files with one name: a file directly in the folder wins over one in a subfolder, then the
  earlier suffix, then sorted path order. (A1111 keeps whichever its walk meets last; voidprompt
  keeps the folder's own file, which is what its listing has always shown.)
- symlinks: a link whose target lies inside the folder is listed; one that resolves outside the
  folder is skipped with a warning, and links to directories are not descended (pathlib's ``**``).
  A1111 follows every link. The stricter rule means a link dropped into a shared models folder
  cannot expose a file from elsewhere; to use another disk's networks, configure that folder
  itself (the configured folder may be a link: it is resolved first);
- names A1111 never lists are left out: a hypernetwork named ``None``.

LoRAs also answer to their alias, the ``ss_output_name`` of a ``.safetensors`` file's metadata
(A1111's ``NetworkOnDisk.alias``): a name that is a file name picks that file; otherwise the file
whose alias it is, unless the alias is ambiguous - A1111's ``forbidden_network_aliases``: an alias that
equals another listed file's name or alias (compared in lower case, as A1111 records them), and the
aliases ``none`` and ``Addams``. Aliases are read only when a name is not a file name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from voidprompt.errors import ModelLoadError, VoidpromptError
from voidprompt.models.load import open_checkpoint
from voidprompt.models.networks.lora import LORA_SUFFIXES

__all__ = [
    "HYPERNETWORK",
    "LORA",
    "NetworkKind",
    "NetworkList",
    "alias_from_metadata",
    "read_lora_alias",
    "scan_network_folder",
    "unknown_network",
]

log = logging.getLogger(__name__)

# A1111 seeds its forbidden aliases with these two (lower case).
_ALWAYS_FORBIDDEN_ALIASES = frozenset({"none", "addams"})


@dataclass(frozen=True)
class NetworkKind:
    """What one kind of network folder holds and how its names are matched."""

    label: str  # in messages: "LoRA", "hypernetwork"
    suffixes: tuple[str, ...]
    aliases: bool = False  # LoRAs also answer to their ss_output_name
    hidden: frozenset[str] = frozenset()  # names never listed


LORA = NetworkKind("LoRA", LORA_SUFFIXES, aliases=True)
HYPERNETWORK = NetworkKind("hypernetwork", (".pt",), hidden=frozenset({"None"}))


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def scan_network_folder(
    folder: Path | None,
    suffixes: Sequence[str],
    *,
    ignore_case: bool = False,
    hidden: frozenset[str] = frozenset(),
) -> dict[str, Path]:
    """``{name: path}`` of the files ``folder`` lists, by the rules of the module docstring, sorted
    by name (case-insensitive, as A1111 lists them). An absent or unconfigured folder lists nothing."""
    if folder is None or not folder.is_dir():
        return {}
    candidates: dict[str, tuple[tuple[int, int, int], Path]] = {}
    for order, path in enumerate(sorted(folder.rglob("*"))):
        file_name = path.name.lower() if ignore_case else path.name
        suffix = next((s for s in suffixes if file_name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        if not _inside(path, folder):
            log.warning("%s: a link out of %s; skipped", path, folder)
            continue
        name = path.name[: -len(suffix)]
        if not name or name in hidden:
            continue
        direct = path.parent == folder
        key = (0 if direct else 1, list(suffixes).index(suffix), order)
        best = candidates.get(name)
        if best is None or key < best[0]:
            candidates[name] = (key, path)
    return {name: candidates[name][1] for name in sorted(candidates, key=str.lower)}


def alias_from_metadata(name: str, metadata: Mapping[str, object]) -> str:
    """A LoRA's alias: its ``ss_output_name``, else its file name (A1111 ``NetworkOnDisk.alias``)."""
    alias = metadata.get("ss_output_name", name)
    return str(alias) if alias is not None else name


def read_lora_alias(name: str, path: Path) -> str:
    """The alias of the LoRA file ``path`` listed as ``name``; its name when it has none."""
    if path.suffix.lower() != ".safetensors":
        return name  # A1111 reads metadata from safetensors files only
    try:
        with open_checkpoint(path) as reader:
            return alias_from_metadata(name, reader.metadata)
    except (VoidpromptError, OSError) as error:
        log.warning("LoRA %s: metadata not readable, no alias: %s", path, error)
        return name


def unknown_network(kind: NetworkKind, name: str, folder: Path, available: Sequence[str]) -> ModelLoadError:
    """The one message for a name the folder does not list: it never depends on what exists
    elsewhere on disk, so it reveals nothing about paths outside the folder."""
    shown = ", ".join(sorted(available, key=str.lower)[:20]) or "none"
    return ModelLoadError(
        f"unknown network '{name}': no {kind.label} of that name in {folder} (a name is a file name "
        f"there without its extension{', or a LoRA alias' if kind.aliases else ''}); available: "
        f"{shown}. Fix the name in the prompt or add the file to the folder."
    )


@dataclass
class NetworkList:
    """One scan of one folder: names, and (for LoRAs, read on first need) aliases."""

    kind: NetworkKind
    folder: Path
    files: dict[str, Path]
    read_alias: Callable[[str, Path], str] = read_lora_alias
    _aliases: dict[str, Path] | None = field(default=None, repr=False)
    _forbidden: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def scan(cls, kind: NetworkKind, folder: str | Path) -> NetworkList:
        root = Path(folder)
        if not root.is_dir():
            raise ModelLoadError(
                f"{kind.label} folder {root} does not exist; create it or pass the right folder."
            )
        return cls(kind, root, scan_network_folder(root, kind.suffixes, hidden=kind.hidden))

    def find(self, name: str) -> Path | None:
        """The listed file ``name`` stands for, or None."""
        hit = self.files.get(name)
        if hit is not None or not self.kind.aliases:
            return hit
        if name.lower() in self._alias_table()[1]:
            return None
        return self._alias_table()[0].get(name)

    def resolve(self, name: str) -> Path:
        hit = self.find(name)
        if hit is None:
            raise unknown_network(self.kind, name, self.folder, list(self.files))
        return hit

    def _alias_table(self) -> tuple[dict[str, Path], set[str]]:
        if self._aliases is None:
            aliases: dict[str, Path] = {}
            forbidden = set(_ALWAYS_FORBIDDEN_ALIASES)
            names = set(self.files)
            for name, path in self.files.items():
                alias = self.read_alias(name, path)
                if alias == name:
                    continue
                if alias in names or alias in aliases:
                    forbidden.add(alias.lower())
                aliases[alias] = path
            self._aliases, self._forbidden = aliases, forbidden
        return self._aliases, self._forbidden

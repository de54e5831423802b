"""Upscaler names, as A1111 lists them (``shared.sd_upscalers``): the built-ins None, Lanczos and
Nearest first, then model upscalers sorted by lower-cased name. Model upscalers come from files a
user placed in ``<models>/ESRGAN`` (each file under its own stem) and ``<models>/RealESRGAN`` (A1111's
Real-ESRGAN names, each tied to one released file). Nothing is ever downloaded: a known name whose
file is absent is refused with a message naming the file and the folder to put it in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.models.upscalers.rrdb import RRDBNet
from voidprompt.models.upscalers.tiled import (
    DEFAULT_TILE,
    DEFAULT_TILE_OVERLAP,
    model_upscale,
    upscale_with_model,
)

__all__ = [
    "ESRGAN_DEFAULT_FILE",
    "PIXEL_UPSCALERS",
    "REALESRGAN_MODELS",
    "RealESRGANModel",
    "UpscalerEntry",
    "Upscalers",
]

# A1111's built-in pixel upscalers: name -> Pillow filter (None: no upscale step at all).
PIXEL_UPSCALERS: dict[str, Image.Resampling | None] = {
    "None": None,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}

ESRGAN_EXTENSIONS = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class RealESRGANModel:
    file: str  # the released file's name, which A1111 looks for in models/RealESRGAN
    scale: int
    url: str  # where A1111 would download it from (reported by /sdapi/v1/upscalers, never fetched)


# A1111's Real-ESRGAN names that are RRDBNet files (its other three, the "General" and "AnimeVideo"
# models, are SRVGGNet, which voidprompt does not run).
REALESRGAN_MODELS: dict[str, RealESRGANModel] = {
    "R-ESRGAN 4x+": RealESRGANModel(
        "RealESRGAN_x4plus.pth",
        4,
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
    ),
    "R-ESRGAN 4x+ Anime6B": RealESRGANModel(
        "RealESRGAN_x4plus_anime_6B.pth",
        4,
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
    ),
    "R-ESRGAN 2x+": RealESRGANModel(
        "RealESRGAN_x2plus.pth",
        2,
        "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
    ),
}
_SRVGG_NAMES = ("R-ESRGAN General 4xV3", "R-ESRGAN General WDN 4xV3", "R-ESRGAN AnimeVideo")
# The name A1111 gives its ESRGAN download (models/ESRGAN/ESRGAN_4x.pth) when the folder is empty.
ESRGAN_DEFAULT_FILE = "ESRGAN_4x.pth"


@dataclass(frozen=True)
class UpscalerEntry:
    """One name in the list, with A1111's ``/sdapi/v1/upscalers`` fields."""

    name: str
    kind: str  # "pixel", "ESRGAN" or "RealESRGAN"
    path: Path | None = None  # the model file (model upscalers)
    model_name: str | None = None
    model_path: str | None = None
    scale: float = 4  # A1111's UpscalerData default, which it reports for every ESRGAN file too

    @property
    def is_model(self) -> bool:
        return self.path is not None


def _files(folders: Sequence[Path], extensions: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for folder in folders:
        if folder.is_dir():
            out.extend(sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions))
    return out


class Upscalers:
    """The upscalers a process can use, found in its ESRGAN and RealESRGAN folders at each lookup
    (a file dropped in the folder is usable without a restart)."""

    def __init__(
        self,
        esrgan_dirs: Sequence[str | Path] = (),
        realesrgan_dirs: Sequence[str | Path] = (),
        *,
        tile: int = DEFAULT_TILE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        device: torch.device | str = "cpu",
    ) -> None:
        self.esrgan_dirs = [Path(d) for d in esrgan_dirs]
        self.realesrgan_dirs = [Path(d) for d in realesrgan_dirs]
        self.tile = DEFAULT_TILE
        self.tile_overlap = DEFAULT_TILE_OVERLAP
        self.set_tiles(tile, tile_overlap)
        self.device = torch.device(device)
        # The last model read, by (path, size, mtime): a hires batch or an extras batch upscales
        # every picture with the same file.
        self._loaded: tuple[tuple[Path, int, int], RRDBNet] | None = None

    @staticmethod
    def check_tiles(tile: int, tile_overlap: int) -> None:
        """Refuse a tile size and overlap A1111's tiled run cannot use (its ``ESRGAN_tile`` and
        ``ESRGAN_tile_overlap`` settings)."""
        if tile < 0 or tile_overlap < 0 or (tile > 0 and tile_overlap >= tile):
            raise InvalidRequestError(
                f"upscaler tiles of {tile} px overlapping by {tile_overlap}: use a tile of 0 (no tiling) or "
                "more, and an overlap from 0 to below the tile (A1111's defaults: 192 and 8)"
            )

    def set_tiles(self, tile: int, tile_overlap: int) -> None:
        """Use ``tile`` px tiles overlapping by ``tile_overlap`` from the next upscale on."""
        self.check_tiles(tile, tile_overlap)
        self.tile, self.tile_overlap = tile, tile_overlap

    @classmethod
    def in_models_dir(
        cls,
        models_dir: str | Path,
        *,
        tile: int = DEFAULT_TILE,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        device: torch.device | str = "cpu",
    ) -> Upscalers:
        """A1111's layout: ``<models_dir>/ESRGAN`` and ``<models_dir>/RealESRGAN``."""
        root = Path(models_dir)
        return cls(
            [root / "ESRGAN"], [root / "RealESRGAN"], tile=tile, tile_overlap=tile_overlap, device=device
        )

    def model(self, entry: UpscalerEntry) -> RRDBNet:
        """The network of a model upscaler, read from its file unless it was the last one read."""
        assert entry.path is not None
        stat = entry.path.stat()
        key = (entry.path, stat.st_size, stat.st_mtime_ns)
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # free the previous network before reading the next
            self._loaded = (key, load_rrdbnet(entry.path, self.device))
        return self._loaded[1]

    def _model_entries(self) -> list[UpscalerEntry]:
        entries = [
            UpscalerEntry(p.stem, "ESRGAN", p, model_name="ESRGAN_4x", model_path=str(p))
            for p in _files(self.esrgan_dirs, ESRGAN_EXTENSIONS)
        ]
        present = _files(self.realesrgan_dirs, (".pth",))
        for name, spec in REALESRGAN_MODELS.items():
            match = next((p for p in present if p.name.endswith(spec.file)), None)
            if match is not None:
                entries.append(
                    UpscalerEntry(name, "RealESRGAN", match, model_path=spec.url, scale=spec.scale)
                )
        return entries

    def entries(self) -> list[UpscalerEntry]:
        """Every usable name in A1111's order (built-ins first, then by lower-cased name)."""
        builtins = [UpscalerEntry(name, "pixel") for name in PIXEL_UPSCALERS]
        models = sorted(self._model_entries(), key=lambda e: e.name.lower())
        return builtins + models

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]

    def missing_hint(self, name: str) -> str | None:
        """For one of A1111's own model names that is not here: what to do about it."""
        esrgan = self.esrgan_dirs[0] if self.esrgan_dirs else Path("models/ESRGAN")
        realesrgan = self.realesrgan_dirs[0] if self.realesrgan_dirs else Path("models/RealESRGAN")
        if name in REALESRGAN_MODELS:
            return (
                f"upscaler {name!r} needs its file {REALESRGAN_MODELS[name].file}; place it in {realesrgan}"
            )
        if name in _SRVGG_NAMES:
            return (
                f"upscaler {name!r} is an SRVGGNet model, which voidprompt does not run; "
                "use an ESRGAN (RRDBNet) file"
            )
        if name == Path(ESRGAN_DEFAULT_FILE).stem:
            return f"upscaler {name!r} needs its file {ESRGAN_DEFAULT_FILE}; place it in {esrgan}"
        return None

    def find(self, name: str) -> UpscalerEntry:
        """The entry called ``name``, or InvalidRequestError naming what is available (or, for one of
        A1111's names whose file is absent, the file to place and where)."""
        entries = self.entries()
        for entry in entries:
            if entry.name == name:
                return entry
        hint = self.missing_hint(name)
        if hint is not None:
            raise InvalidRequestError(hint)
        folders = (
            ", ".join(str(d) for d in [*self.esrgan_dirs, *self.realesrgan_dirs]) or "no folder configured"
        )
        raise InvalidRequestError(
            f"upscaler {name!r} is not available; choose one of {', '.join(e.name for e in entries)} "
            f"(model files are looked up in: {folders})"
        )

    def one_pass(self, entry: UpscalerEntry, scale: float) -> Callable[[Image.Image], Image.Image]:
        """What one of ``Upscaler.upscale``'s passes does for ``entry``."""
        if entry.kind == "pixel":
            resample = PIXEL_UPSCALERS[entry.name]
            if resample is None:
                return lambda im: im
            # A1111's Lanczos / Nearest scale by the whole factor in one step (truncated sizes).
            return lambda im: im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
        # A1111 1.10 reads the file again at every pass; the weights are the same each time.
        net = self.model(entry)
        return lambda im: upscale_with_model(
            net, im, tile=self.tile, overlap=self.tile_overlap, device=self.device
        )

    def upscale(self, image: Image.Image, scale: float, name: str) -> Image.Image:
        """A1111's ``upscaler.scaler.upscale(image, scale, data_path)`` for the upscaler ``name``:
        passes until ``(size * scale) // 8 * 8``, then Lanczos to that size."""
        entry = self.find(name)
        return model_upscale(self.one_pass(entry, scale), image, scale)

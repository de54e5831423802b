"""One compressed file per picture: ``NAME.explain.npz`` beside ``NAME.png``.

An ``.npz`` (deflate) read with ``allow_pickle=False``, so loading one never runs code from it. Maps
are stored as 8-bit fractions of their own maximum (the maximum beside them, in float32), at most
``map_side`` cells on the long side (area-averaged down from the latent size); previews as 8-bit
RGB at latent resolution (a hires fix run's first-pass previews with their cells repeated to the
hires size). The description (tags, tokens, windows, calls, shares) is JSON in the
``meta`` entry. Written through a temporary file and a rename: a reader sees the old file or the new
one, never half of one.

The size, with the defaults (per-tag maps at most 24 cells a side, a preview every 5th call and the
last), measured on the miniature model at 512x512 (64x64 latent, Euler a, 20 steps, 38 tags, five
previews): 256 kB - about 2 kB per tag (four windows) and 36 kB per preview step (three RGB pictures
and the difference map), so about 220 kB for 20 tags; at its own 128x128, under 40 kB. Previews are
stored losslessly, so they do not shrink further: ``preview_every`` and ``map_side`` trade detail for
room.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from voidprompt.errors import VoidpromptError
from voidprompt.explain.record import CallInfo, Explanation, Preview, TagInfo, TokenInfo
from voidprompt.files import atomic_write

FORMAT_VERSION = 1
SUFFIX = ".explain.npz"
DEFAULT_MAP_SIDE = 24
# A file far above the budget is not an explanation this code wrote.
MAX_FILE_BYTES = 256 * 1024 * 1024


class ExplanationFileError(VoidpromptError):
    """An explanation file that cannot be read."""


def explanation_path(image_path: str | os.PathLike[str]) -> Path:
    """Where the explanation of the picture at ``image_path`` lives: ``NAME.explain.npz`` beside it."""
    path = Path(image_path)
    return path.with_name(path.stem + SUFFIX)


def save_explanation(
    path: str | os.PathLike[str], explanation: Explanation, *, map_side: int = DEFAULT_MAP_SIDE
) -> Path:
    """Write ``explanation`` to ``path`` (atomically); returns the path."""
    if map_side < 1:
        raise ValueError(f"map_side must be at least 1 cell, got {map_side}")
    arrays: dict[str, np.ndarray] = {}
    map_size = _map_size(explanation.latent_size, map_side)
    arrays["tag_maps"], arrays["tag_scale"] = _quantize_maps(explanation.tag_maps, map_size)
    if explanation.token_maps is not None:
        arrays["token_maps"], arrays["token_scale"] = _quantize_maps(explanation.token_maps, map_size)
    previews = explanation.previews
    previews_meta = []
    if previews:
        # A hires fix run previews its first pass at the smaller latent size: one stack needs one size.
        size = max((p.combined.shape[:2] for p in previews), key=lambda hw: hw[0] * hw[1])
        arrays["preview_prompt"] = np.stack([_nearest(p.prompt, size) for p in previews])
        arrays["preview_combined"] = np.stack([_nearest(p.combined, size) for p in previews])
        blank = np.zeros((*size, 3), dtype=np.uint8)
        arrays["preview_negative"] = np.stack(
            [_nearest(p.negative, size) if p.negative is not None else blank for p in previews]
        )
        flat = np.zeros(size, dtype=np.float32)
        differences = np.stack(
            [_nearest(p.difference, size) if p.difference is not None else flat for p in previews]
        )
        arrays["preview_difference"], arrays["preview_difference_scale"] = _quantize(differences)
        previews_meta = [
            {"call": p.call, "negative": p.negative is not None, "difference": p.difference is not None}
            for p in previews
        ]
    for call, pixels in explanation.vae_previews.items():
        arrays[f"vae_{call}"] = pixels
    meta = {
        "version": FORMAT_VERSION,
        "latent_size": list(explanation.latent_size),
        "map_size": list(map_size),
        "windows": list(explanation.windows),
        "window_calls": {k: list(v) for k, v in explanation.window_calls.items()},
        "tags": [asdict(t) for t in explanation.tags],
        "tokens": [asdict(t) for t in explanation.tokens],
        "calls": [asdict(c) for c in explanation.calls],
        "content_share": explanation.content_share,
        "previews": previews_meta,
        "vae_calls": sorted(explanation.vae_previews),
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)

    return atomic_write(path, lambda temp: _write_npz(temp, arrays))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed``'s layout with a fixed member date, so the same explanation always gives
    the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def load_explanation(path: str | os.PathLike[str]) -> Explanation:
    """Read an explanation file; maps come back at their stored size, as float32 in the units of the
    captured maps. Anything else than a file this module wrote is a one-line error."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ExplanationFileError(f"{path}: cannot read the explanation file ({exc.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise ExplanationFileError(f"{path}: {size} bytes is too big for an explanation file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        meta = json.loads(bytes(arrays.pop("meta")).decode())
        return _explanation(meta, arrays)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ExplanationFileError(
            f"{path}: not a readable explanation file ({exc}); regenerate it with the capture on"
        ) from None


def _explanation(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Explanation:
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {meta.get('version')!r}, this voidprompt reads {FORMAT_VERSION}")
    tag_maps = _dequantize(arrays["tag_maps"], arrays["tag_scale"])
    token_maps = None
    if "token_maps" in arrays:
        token_maps = _dequantize(arrays["token_maps"], arrays["token_scale"])
    previews = []
    for i, p in enumerate(meta["previews"]):
        difference = (
            arrays["preview_difference"][i].astype(np.float32) / 255.0 * arrays["preview_difference_scale"][i]
        )
        previews.append(
            Preview(
                call=int(p["call"]),
                prompt=arrays["preview_prompt"][i],
                negative=arrays["preview_negative"][i] if p["negative"] else None,
                combined=arrays["preview_combined"][i],
                difference=difference if p["difference"] else None,
            )
        )
    return Explanation(
        latent_size=(int(meta["latent_size"][0]), int(meta["latent_size"][1])),
        windows=tuple(meta["windows"]),
        window_calls={k: tuple(int(c) for c in v) for k, v in meta["window_calls"].items()},
        tags=tuple(TagInfo(**{**t, "tokens": tuple(t["tokens"])}) for t in meta["tags"]),
        tag_maps=tag_maps,
        content_share=meta["content_share"],
        calls=tuple(CallInfo(**c) for c in meta["calls"]),
        previews=tuple(previews),
        tokens=tuple(TokenInfo(**t) for t in meta["tokens"]),
        token_maps=token_maps,
        vae_previews={int(c): arrays[f"vae_{c}"] for c in meta["vae_calls"]},
    )


def _nearest(pixels: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(h, w, ...) cells repeated to ``size`` (nearest cell), so that every stored value is a captured one."""
    if pixels.shape[:2] == tuple(size):
        return pixels
    rows = ((np.arange(size[0]) + 0.5) * pixels.shape[0] / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * pixels.shape[1] / size[1]).astype(int)
    return pixels[rows][:, cols]


def _map_size(latent_size: tuple[int, int], map_side: int) -> tuple[int, int]:
    height, width = latent_size
    longest = max(height, width)
    if longest <= map_side:
        return height, width
    return max(1, round(height * map_side / longest)), max(1, round(width * map_side / longest))


def _quantize_maps(maps: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(n, windows, h, w) float -> uint8 at ``size`` and each map's maximum (NaN for a missing map)."""
    n, windows = maps.shape[:2]
    if maps.size and tuple(maps.shape[2:]) != size:
        pooled = F.adaptive_avg_pool2d(
            torch.from_numpy(np.ascontiguousarray(maps)).reshape(n * windows, 1, *maps.shape[2:]), size
        )
        maps = pooled.reshape(n, windows, *size).numpy()
    return _quantize(maps, axes=2)


def _quantize(values: np.ndarray, axes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    lead = values.shape[:axes]
    flat = values.reshape(*lead, -1) if values.size else values.reshape(*lead, 0)
    scale = np.nanmax(np.abs(flat), axis=-1, initial=0.0) if flat.shape[-1] else np.zeros(lead)
    missing = np.isnan(flat).all(axis=-1) if flat.shape[-1] else np.zeros(lead, dtype=bool)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    quantized = np.rint(np.nan_to_num(flat / safe, nan=0.0).clip(0.0, 1.0) * 255.0).astype(np.uint8)
    scale = np.where(missing, np.nan, scale).astype(np.float32)
    return quantized.reshape(values.shape), scale


def _dequantize(quantized: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return quantized.astype(np.float32) / 255.0 * scale[..., None, None]

"""A1111's way of running a model upscaler over a picture: tiles cut and blended with
``images.split_grid`` / ``images.combine_grid``'s geometry, each tile fed to the model as BGR
floats, and ``Upscaler.upscale``'s up-to-three passes then a Lanczos resize to the target.

Everything is done on PIL images with Pillow's pastes and masks, as A1111 does, so the 8-bit rounding
of the blend is Pillow's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_TILE_OVERLAP",
    "Grid",
    "Tile",
    "TileRow",
    "combine_grid",
    "model_upscale",
    "run_model_on_image",
    "split_grid",
    "upscale_with_model",
]

DEFAULT_TILE = 192  # A1111's ESRGAN_tile option
DEFAULT_TILE_OVERLAP = 8  # A1111's ESRGAN_tile_overlap option
MAX_PASSES = 3  # A1111's Upscaler.upscale runs the model at most three times

ImageModel = Callable[[Tensor], Tensor]


@dataclass
class Tile:
    x: int
    width: int
    image: Image.Image


@dataclass
class TileRow:
    y: int
    height: int
    tiles: list[Tile] = field(default_factory=list)


@dataclass
class Grid:
    rows: list[TileRow]
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int

    @property
    def tile_count(self) -> int:
        return sum(len(row.tiles) for row in self.rows)


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    # Tiles spread evenly (float step, truncated), the last one flush with the far edge. A picture
    # smaller than a tile gets one tile starting at a negative offset: Pillow's crop fills the part
    # outside the picture with black.
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    out = []
    for i in range(count):
        start = int(i * step)
        if start + tile >= size:
            start = size - tile
        out.append(start)
    return out


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """A1111's ``images.split_grid``: overlapping ``tile_w`` x ``tile_h`` crops covering ``image``."""
    w, h = image.size
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    xs = _starts(w, tile_w, overlap)
    for y in _starts(h, tile_h, overlap):
        row = TileRow(y, tile_h)
        for x in xs:
            row.tiles.append(Tile(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append(row)
    return grid


def _ramp(length: int, overlap: int, horizontal: bool) -> Image.Image:
    # A linear 0 -> 255 * (overlap - 1) / overlap ramp across the overlap (8-bit, truncated),
    # repeated along the seam.
    values = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    if horizontal:
        return Image.fromarray(np.repeat(values[None, :], length, axis=0), "L")
    return Image.fromarray(np.repeat(values[:, None], length, axis=1), "L")


def combine_grid(grid: Grid) -> Image.Image:
    """A1111's ``images.combine_grid``: each tile after the first in a row is blended over its left
    neighbour across the overlap, then each row over the one above; only the first tile of a row (at
    x == 0) and the first row (at y == 0) are pasted without a blend."""
    mask_w = _ramp(grid.tile_h, grid.overlap, horizontal=True)
    mask_h = _ramp(grid.image_w, grid.overlap, horizontal=False)
    out = Image.new("RGB", (grid.image_w, grid.image_h))
    for row in grid.rows:
        strip = Image.new("RGB", (grid.image_w, row.height))
        for tile in row.tiles:
            if tile.x == 0:
                strip.paste(tile.image, (0, 0))
                continue
            strip.paste(tile.image.crop((0, 0, grid.overlap, row.height)), (tile.x, 0), mask=mask_w)
            strip.paste(
                tile.image.crop((grid.overlap, 0, tile.width, row.height)), (tile.x + grid.overlap, 0)
            )
        if row.y == 0:
            out.paste(strip, (0, 0))
            continue
        out.paste(strip.crop((0, 0, strip.width, grid.overlap)), (0, row.y), mask=mask_h)
        out.paste(strip.crop((0, grid.overlap, strip.width, row.height)), (0, row.y + grid.overlap))
    return out


def run_model_on_image(
    model: ImageModel, image: Image.Image, device: torch.device, dtype: torch.dtype
) -> Image.Image:
    """One model call on a whole picture, A1111's ``upscale_without_tiling``: RGB -> BGR, /255 in
    float64 then the model's dtype, the output clamped to [0, 1], x255 and truncated to 8 bits."""
    bgr = np.asarray(image.convert("RGB"))[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)) / 255).float()
    with torch.no_grad():
        y = model(x.unsqueeze(0).to(device=device, dtype=dtype))
    out = y.squeeze(0).float().cpu().clamp_(0, 1).numpy()
    pixels = (255.0 * np.moveaxis(out, 0, 2)).astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def upscale_with_model(
    model: ImageModel,
    image: Image.Image,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_TILE_OVERLAP,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Image.Image:
    """One pass of ``model`` over ``image``, tiled as A1111's ``upscale_with_model`` (``tile`` 0: the
    whole picture in one call). The scale is read from the first tile's output."""
    dev = device if device is not None else torch.device("cpu")
    if tile <= 0:
        return run_model_on_image(model, image, dev, dtype)
    grid = split_grid(image, tile, tile, overlap)
    scale = 1
    rows: list[TileRow] = []
    for row in grid.rows:
        new_tiles = []
        for t in row.tiles:
            out = run_model_on_image(model, t.image, dev, dtype)
            scale = out.width // t.image.width
            new_tiles.append(Tile(t.x * scale, t.width * scale, out))
        rows.append(TileRow(row.y * scale, row.height * scale, new_tiles))
    return combine_grid(
        Grid(
            rows,
            grid.tile_w * scale,
            grid.tile_h * scale,
            grid.image_w * scale,
            grid.image_h * scale,
            grid.overlap * scale,
        )
    )


def model_upscale(
    one_pass: Callable[[Image.Image], Image.Image], image: Image.Image, scale: float
) -> Image.Image:
    """A1111's ``Upscaler.upscale``: run ``one_pass`` until the picture reaches
    ``(size * scale) // 8 * 8`` on both sides (at most three times, stopping early if a pass leaves
    the size unchanged), then Lanczos to exactly that size."""
    dest_w = int((image.width * scale) // 8 * 8)
    dest_h = int((image.height * scale) // 8 * 8)
    for _ in range(MAX_PASSES):
        before = image.size
        image = one_pass(image)
        if image.size == before or (image.width >= dest_w and image.height >= dest_h):
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=Image.Resampling.LANCZOS)
    return image

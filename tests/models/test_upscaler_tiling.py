"""A1111's tiled upscale: the split geometry derived by hand, the blend against an independent
numpy re-implementation of Pillow's masked paste, a pointwise model (tiled equals whole), the BGR feed
and the pass count of ``Upscaler.upscale``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from voidprompt.models.upscalers.tiled import model_upscale, split_grid, upscale_with_model


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def test_split_positions_by_hand() -> None:
    # 400 wide, tiles of 192 overlapping 8: ceil(392 / 184) = 3 columns, step (400 - 192) / 2 = 104.
    # 200 high: ceil(192 / 184) = 2 rows, step 8.
    grid = split_grid(_picture(400, 200), 192, 192, 8)
    assert [t.x for t in grid.rows[0].tiles] == [0, 104, 208]
    assert [r.y for r in grid.rows] == [0, 8]
    # A picture smaller than a tile: one tile, starting left of it, black where the picture is not.
    small = split_grid(_picture(100, 60), 192, 192, 8)
    assert [r.y for r in small.rows] == [-132] and [t.x for t in small.rows[0].tiles] == [-92]
    tile = np.asarray(small.rows[0].tiles[0].image)
    assert tile[:, :92].max() == 0 and tile[:132].max() == 0


def _nearest2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _blur2x(x: Tensor) -> Tensor:
    # Not pointwise: every output pixel depends on its neighbours, so tiles disagree near their edges.
    kernel = torch.full((3, 1, 3, 3), 1.0 / 9.0)
    return _nearest2x(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3))


def _to_u8(model, tile: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    bgr = torch.from_numpy(np.ascontiguousarray(tile[:, :, ::-1].transpose(2, 0, 1)).astype(np.float64) / 255)
    y = model(bgr.float()[None])[0].clamp(0, 1).numpy()
    return (255.0 * y.transpose(1, 2, 0)).astype(np.uint8)[:, :, ::-1]


def _blend(dst: np.ndarray, src: np.ndarray, mask: np.ndarray) -> np.ndarray:
    # Pillow's 8-bit masked paste: (dst * (255 - m) + src * m) / 255, rounded with its +128 trick.
    m = mask.astype(np.int64)[..., None]
    t = dst.astype(np.int64) * (255 - m) + src.astype(np.int64) * m + 128
    return (((t >> 8) + t) >> 8).astype(np.uint8)


def _reference_tiled(model, img: np.ndarray, tile: int, overlap: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Split, run and blend written out from A1111's description, on numpy arrays."""
    h, w = img.shape[:2]

    def starts(size: int) -> list[int]:
        n = -(-(size - overlap) // (tile - overlap))
        step = (size - tile) / (n - 1) if n > 1 else 0
        return [min(int(i * step), size - tile) for i in range(n)]

    s = 2
    ramp = (np.arange(overlap * s, dtype=np.float32) * 255 / (overlap * s)).astype(np.uint8)
    out = np.zeros((h * s, w * s, 3), np.uint8)
    for y in starts(h):
        strip = np.zeros((tile * s, w * s, 3), np.uint8)
        for x in starts(w):
            up = _to_u8(model, img[y : y + tile, x : x + tile])
            X, o = x * s, overlap * s
            if x == 0:
                strip[:, : tile * s] = up
                continue
            strip[:, X : X + o] = _blend(
                strip[:, X : X + o], up[:, :o], np.broadcast_to(ramp[None, :], (tile * s, o))
            )
            strip[:, X + o : X + tile * s] = up[:, o:]
        Y, o = y * s, overlap * s
        if y == 0:
            out[: tile * s] = strip
            continue
        out[Y : Y + o] = _blend(out[Y : Y + o], strip[:o], np.broadcast_to(ramp[:, None], (o, w * s)))
        out[Y + o : Y + tile * s] = strip[o:]
    return out


@pytest.mark.parametrize("model", [_nearest2x, _blur2x], ids=["pointwise", "blur"])
def test_tiled_run_equals_independent_split_and_blend(model) -> None:  # type: ignore[no-untyped-def]
    img = _picture(70, 52, seed=3)
    ours = np.asarray(upscale_with_model(model, img, tile=32, overlap=6))
    assert ours.shape == (104, 140, 3)
    np.testing.assert_array_equal(ours, _reference_tiled(model, np.asarray(img), 32, 6))


def test_pointwise_model_tiled_equals_whole() -> None:
    img = _picture(70, 52, seed=4)
    tiled = np.asarray(upscale_with_model(_nearest2x, img, tile=32, overlap=6))
    whole = np.asarray(upscale_with_model(_nearest2x, img, tile=0))
    np.testing.assert_array_equal(whole, np.asarray(img.resize((140, 104), Image.Resampling.NEAREST)))
    # The blend mixes equal values in every overlap, which Pillow's rounding returns unchanged.
    np.testing.assert_array_equal(tiled, whole)
    # A model that looks at neighbours differs from the whole-picture run only near seams.
    blurred_tiled = np.asarray(upscale_with_model(_blur2x, img, tile=32, overlap=6)).astype(int)
    blurred_whole = np.asarray(upscale_with_model(_blur2x, img, tile=0)).astype(int)
    differs = np.argwhere(np.abs(blurred_tiled - blurred_whole).max(axis=2) > 0)
    assert len(differs) > 0
    # Tile edges (input pixels): columns start at 0, 19, 38 (step (70 - 32) / 2), rows at 0, 20.
    x_edges, y_edges = {19, 32, 38, 51}, {20, 32}
    for y, x in differs // 2:
        assert min(abs(x - e) for e in x_edges) <= 6 or min(abs(y - e) for e in y_edges) <= 6, (x, y)


def test_model_is_fed_bgr() -> None:
    # A model that keeps only its first input channel: A1111 feeds BGR, so blue survives.
    img = Image.new("RGB", (8, 8), (10, 20, 30))

    def first_channel(x: Tensor) -> Tensor:
        return x * torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)

    out = upscale_with_model(first_channel, img, tile=0)
    assert out.getpixel((3, 3)) == (0, 0, 30)


def test_passes_until_the_target_then_lanczos() -> None:
    calls: list[tuple[int, int]] = []

    def twice(im: Image.Image) -> Image.Image:
        calls.append(im.size)
        return im.resize((im.width * 2, im.height * 2), Image.Resampling.NEAREST)

    # x3 of 20x12: target (60 // 8 * 8, 36 // 8 * 8) = (56, 32); 2x gives 40x24, then 80x48 >= target.
    out = model_upscale(twice, _picture(20, 12), 3)
    assert calls == [(20, 12), (40, 24)] and out.size == (56, 32)
    calls.clear()
    # x8: three passes at most (160x96), then Lanczos up to the target 160x96 - already there.
    assert model_upscale(twice, _picture(20, 12), 16).size == (320, 192)
    assert len(calls) == 3
    calls.clear()
    # A pass that does not change the size stops the loop.
    assert model_upscale(lambda im: (calls.append(im.size), im)[1], _picture(20, 12), 2).size == (40, 24)
    assert len(calls) == 1

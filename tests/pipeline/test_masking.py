"""Mask handling: binarising, the Gaussian blur, crop regions, fill, overlay, outpainting masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.pipeline import masking


def test_kernel_is_closed_form_gaussian() -> None:
    sigma = 4.0
    kernel = masking.gaussian_kernel(sigma)
    # ksize = 2*int(2.5*4 + 0.5) + 1 = 2*10 + 1 = 21
    assert kernel.shape == (21,)
    raw = [math.exp(-(x * x) / (2 * 16.0)) for x in range(-10, 11)]
    expected = np.array(raw) / sum(raw)
    np.testing.assert_allclose(kernel, expected, rtol=1e-12)
    assert masking.gaussian_kernel(1.0).shape == (7,)  # 2*int(3.0) + 1
    assert masking.gaussian_kernel(0.5).shape == (3,)  # 2*int(1.75) + 1
    with pytest.raises(InvalidRequestError, match="sigma=0"):
        masking.gaussian_kernel(0)


def test_blur_of_a_line_is_the_kernel() -> None:
    values = np.zeros((5, 41), dtype=np.uint8)
    values[:, 20] = 255
    out = np.asarray(masking.blur_mask(Image.fromarray(values), 3, 0)).astype(int)
    kernel = masking.gaussian_kernel(3)  # 2*int(8)+1 = 17 taps, radius 8
    expected = np.zeros(41)
    expected[12:29] = np.rint(255 * kernel[::-1])
    assert (out == expected[None, :]).all()  # horizontal only: every row the same


def test_blur_border_is_reflect_101() -> None:
    # A line in column 1: reflect-101 (gfedcb|abcdefgh) mirrors it to column -1.
    values = np.zeros((3, 30), dtype=np.uint8)
    values[:, 1] = 255
    out = np.asarray(masking.blur_mask(Image.fromarray(values), 2, 0)).astype(int)
    k = masking.gaussian_kernel(2)  # 2*int(5.5)+1 = 11 taps, radius 5
    r = 5

    # Column j sums the taps that land on column 1 and on its mirror, column -1.
    def tap(i: int) -> float:
        return float(k[i]) if 0 <= i <= 2 * r else 0.0

    for j in range(8):
        expected = 255 * (tap(r + 1 - j) + tap(r - 1 - j))
        assert out[0, j] == round(expected), j


def test_blur_runs_x_then_y() -> None:
    values = np.zeros((21, 21), dtype=np.uint8)
    values[10, 10] = 255
    both = np.asarray(masking.blur_mask(Image.fromarray(values), 2, 3))
    x_only = masking.blur_mask(Image.fromarray(values), 2, 0)
    assert np.array_equal(both, np.asarray(masking.blur_mask(x_only, 0, 3)))
    assert both[10].argmax() == 10 and both[:, 10].argmax() == 10


def test_create_binary_mask() -> None:
    alpha = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    rgba = np.zeros((1, 4, 4), dtype=np.uint8)
    rgba[..., 3] = alpha
    image = Image.fromarray(rgba, mode="RGBA")
    assert np.asarray(masking.create_binary_mask(image, True)).tolist() == [[0, 0, 255, 255]]
    assert np.asarray(masking.create_binary_mask(image, False)).tolist() == [[0, 128, 129, 255]]
    grey = Image.fromarray(np.array([[0, 100, 200]], dtype=np.uint8), mode="L")
    # A1111 quirk: rounding only applies to alpha masks.
    assert np.asarray(masking.create_binary_mask(grey, True)).tolist() == [[0, 100, 200]]


def test_crop_region_bbox_plus_padding() -> None:
    values = np.zeros((64, 64), dtype=np.uint8)
    values[5:10, 10:20] = 255  # x 10..19, y 5..9
    mask = Image.fromarray(values)
    assert masking.get_crop_region(mask) == (10, 5, 20, 10)
    # pad 4: x1 = 6, y1 = 1, x2 = 20 + 4 = 24, y2 = 10 + 4 = 14
    assert masking.get_crop_region(mask, 4) == (6, 1, 24, 14)
    # pad 8 clips at the top: y1 = max(5 - 8, 0) = 0
    assert masking.get_crop_region(mask, 8) == (2, 0, 28, 18)
    assert masking.get_crop_region(Image.new("L", (8, 8))) is None


def test_expand_crop_region_hand_derived() -> None:
    # 18 x 13 region to a square: desired height 18, diff int(18 - 13) = 5 -> y1 -= 2, y2 += 3
    # -> (-1, 17), shifted down to (0, 18).
    assert masking.expand_crop_region((6, 1, 24, 14), 32, 32, 64, 64) == (6, 0, 24, 18)
    # 10 x 10 region to 4:1: desired width 40, diff 30 -> x1 = 50 - 15 = 35, x2 = 60 + 15 = 75;
    # 75 >= 64 so both shift left by 11 -> (24, 64).
    assert masking.expand_crop_region((50, 10, 60, 20), 64, 16, 64, 64) == (24, 10, 64, 20)
    # Already the right ratio: unchanged.
    assert masking.expand_crop_region((8, 8, 24, 24), 512, 512, 64, 64) == (8, 8, 24, 24)
    # A1111 quirk: too tall for the image -> clipped at the far side only. 40 x 10 to w/h = 0.5:
    # desired height 80, diff 70 -> y (10 - 35, 20 + 35) = (-25, 55) -> shifted (0, 80) -> clipped (0, 64).
    assert masking.expand_crop_region((0, 10, 40, 20), 32, 64, 64, 64) == (0, 0, 40, 64)


def test_fill_keeps_unmasked_and_paints_masked_with_surroundings() -> None:
    image = Image.new("RGB", (32, 32), (100, 150, 200))
    image.paste((0, 0, 0), (12, 12, 20, 20))  # content under the mask that fill must not reuse
    values = np.zeros((32, 32), dtype=np.uint8)
    values[12:20, 12:20] = 255
    out = np.asarray(masking.fill(image, Image.fromarray(values))).astype(int)
    assert (out[values == 0] == [100, 150, 200]).all()
    assert np.abs(out[values == 255] - [100, 150, 200]).max() <= 2


def test_overlay_and_apply_overlay_restore_unmasked_pixels() -> None:
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    generated = Image.new("RGB", (16, 16), (7, 7, 7))
    values = np.zeros((16, 16), dtype=np.uint8)
    values[4:8, 4:8] = 255
    out = np.asarray(
        masking.apply_overlay(generated, None, masking.overlay_image(original, Image.fromarray(values)))
    )
    assert np.array_equal(out[values == 0], np.asarray(original)[values == 0])
    assert (out[values == 255] == 7).all()


def test_apply_overlay_pastes_only_masked_region() -> None:
    original = Image.new("RGB", (32, 32), (50, 60, 70))
    values = np.zeros((32, 32), dtype=np.uint8)
    values[8:16, 8:16] = 255
    overlay = masking.overlay_image(original, Image.fromarray(values))
    generated = Image.new("RGB", (16, 16), (200, 0, 0))  # processed at 16x16, region 8x8 at (8, 8)
    out = np.asarray(masking.apply_overlay(generated, (8, 8, 8, 8), overlay))
    assert (out[8:16, 8:16] == [200, 0, 0]).all()
    assert (out[values == 0] == [50, 60, 70]).all()


def test_latent_mask_downsamples_and_rounds() -> None:
    values = np.zeros((32, 32), dtype=np.uint8)
    values[:, 16:] = 255
    small = masking.latent_mask(Image.fromarray(values), 16, 16, round_mask=True)
    assert small.shape == (16, 16)
    assert (small[:, :8] == 0).all() and (small[:, 8:] == 1).all()

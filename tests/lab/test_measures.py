"""Measures on hand-built images whose values are known in closed form."""

import numpy as np
import pytest
from PIL import Image

from voidprompt.errors import VoidpromptError
from voidprompt.lab import measures as m


def uniform(value: float, size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), value)


def half_black_white(size: int = 8) -> np.ndarray:
    image = np.zeros((size, size, 3))
    image[:, size // 2 :] = 1.0
    return image


def test_uniform_grey() -> None:
    values = m.measure_image(Image.new("RGB", (16, 16), (128, 128, 128)))
    # Rec. 709 weights sum to 1, so grey luma is its own value
    assert values["luminance"] == pytest.approx(128 / 255)
    for name in ("contrast", "saturation", "colourfulness", "edge_density", "high_frequency_energy"):
        assert values[name] == pytest.approx(0.0, abs=1e-12), name
    assert values["salient_regions"] == 0.0


def test_half_black_half_white() -> None:
    rgb = half_black_white()
    assert m.mean_luminance(rgb) == pytest.approx(0.5)
    assert m.rms_contrast(rgb) == pytest.approx(0.5)  # std of equal halves of 0 and 1
    # Interior columns 1..6; the kernel spans columns c-1..c+1, so only c = 3 and c = 4 see the step
    assert m.edge_density(rgb) == pytest.approx(2 / 6)
    assert m.sobel_magnitude(m.luma(rgb)).max() == pytest.approx(4.0)


def test_saturation_and_colourfulness() -> None:
    red = np.zeros((8, 8, 3))
    red[..., 0] = 1.0
    assert m.mean_saturation(red) == pytest.approx(1.0)
    # rg = 255, yb = 127.5, no spread: M = 0.3 * sqrt(255^2 + 127.5^2) = 85.529
    assert m.colourfulness(red) == pytest.approx(0.3 * np.sqrt(255**2 + 127.5**2))
    red_green = red.copy()
    red_green[:, 4:] = (0.0, 1.0, 0.0)
    # rg = +-255 (mean 0, std 255), yb = 127.5 everywhere: M = 255 + 0.3 * 127.5
    assert m.colourfulness(red_green) == pytest.approx(293.25)
    assert m.mean_saturation(uniform(0.0)) == 0.0  # black: max is 0


def test_high_frequency_energy() -> None:
    y, x = np.mgrid[0:64, 0:64]
    checker = ((x + y) % 2).astype(float)  # all power at (0.5, 0.5) cycles/px
    assert m.high_frequency_energy(np.stack([checker] * 3, -1)) == pytest.approx(1.0)
    wave = 0.5 + 0.5 * np.cos(2 * np.pi * x / 16)  # exactly bin 4 of 64: 1/16 cycles/px
    assert m.high_frequency_energy(np.stack([wave] * 3, -1)) == pytest.approx(0.0, abs=1e-12)


def two_squares() -> np.ndarray:
    image = np.ones((32, 32, 3))
    image[4:10, 4:10] = 0.0
    image[20:28, 18:26] = (1.0, 0.0, 0.0)
    image[15, 15] = 0.0  # a 1 px speck: below the minimum area
    return image


def test_salient_regions() -> None:
    assert m.salient_regions(two_squares()) == 2.0
    assert m.salient_regions(two_squares(), min_area=1) == 3.0
    diagonal = np.ones((16, 16, 3))
    diagonal[4:8, 4:8] = 0.0
    diagonal[8:12, 8:12] = 0.0  # touching at a corner only: 4-connectivity keeps them apart
    assert m.salient_regions(diagonal) == 2.0


def test_registry_and_inputs() -> None:
    registry = m.default_measures()
    registry["mean_red"] = lambda rgb: float(rgb[..., 0].mean())
    assert "mean_red" not in m.MEASURES  # extending a copy leaves the module alone
    uint8 = (half_black_white() * 255).astype(np.uint8)
    values = m.measure_image(uint8, names=["luminance", "mean_red"], registry=registry)
    assert values == {"luminance": pytest.approx(0.5), "mean_red": pytest.approx(0.5)}
    with pytest.raises(VoidpromptError, match="unknown measure"):
        m.measure_image(uint8, names=["sharpness"])
    with pytest.raises(VoidpromptError, match=r"values in 0\.\.1"):
        m.measure_image(np.full((8, 8, 3), 2.0))
    with pytest.raises(TypeError):
        m.MEASURES["x"] = m.mean_luminance  # type: ignore[index]

"""The detector's fast paths against straightforward versions of the same steps: bit-identical arrays,
scores and detections.

The `_reference_*` helpers below are the plain whole-picture forms of what `detect` now does in
windows, by counting levels or only where it is needed; each test holds a fast step to its reference
on many inputs, and the last ones hold all of `detect` to a detect whose steps are the references."""

import math
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from voidprompt.demo import detector
from voidprompt.demo.detector import (
    DetectedShape,
    Detection,
    DetectorConfig,
    _classify_kind,
    _disk,
    _srgb_to_lab,
    detect,
    vae_standin,
)
from voidprompt.demo.world import PALETTE, SHAPE_COLOURS, Background, Scene, ShapeObject, render

# --- references ---------------------------------------------------------------------------------------


def _reference_nearest_colour(rgb: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    lab_palette = _srgb_to_lab(np.array([PALETTE[n] for n in names], dtype=np.float64) / 255.0)
    d = np.linalg.norm(_srgb_to_lab(rgb)[..., None, :] - lab_palette, axis=-1)
    return np.argmin(d, axis=-1), list(names)


def _reference_line_medians(members: np.ndarray, pixels: np.ndarray, count: int) -> np.ndarray:
    profile = np.full((count, pixels.shape[1]), np.nan)
    for line in range(count):
        on_line = pixels[members == line]
        if len(on_line):
            profile[line] = np.median(on_line, axis=0)
    return profile


def _reference_line_profile_residual(rgb: np.ndarray, usable: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    best: np.ndarray | None = None
    best_score = math.inf
    for key in (xx, yy, xx + yy, xx - yy):
        lines, inverse = np.unique(key.ravel(), return_inverse=True)
        keep = usable.ravel()
        profile = _reference_line_medians(inverse[keep], rgb.reshape(-1, 3)[keep], len(lines))
        residual = np.linalg.norm(rgb.reshape(-1, 3) - profile[inverse], axis=-1).reshape(h, w)
        residual = np.nan_to_num(residual, nan=math.inf)
        score = float(np.median(residual[usable])) if usable.any() else math.inf
        if score < best_score:
            best, best_score = residual, score
    return best if best is not None else np.full((h, w), math.inf)


def _reference_radial_harmonics(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    boundary = mask & ~ndimage.binary_erosion(mask)
    by, bx = np.nonzero(boundary)
    angles = np.arctan2(by - cy, bx - cx)
    radii = np.hypot(by - cy, bx - cx) + 0.5
    bins = 48
    idx = ((angles + math.pi) / (2 * math.pi) * bins).astype(int) % bins
    signature = np.full(bins, np.nan)
    np.fmax.at(signature, idx, radii)
    filled = ~np.isnan(signature)
    if filled.sum() < 6:
        return np.zeros(7)
    positions = np.arange(bins)
    signature = np.interp(positions, positions[filled], signature[filled], period=bins)
    spectrum = np.abs(np.fft.rfft(signature))
    return np.asarray(spectrum[:7] / max(spectrum[0], 1e-9))


def _reference_solidity(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return 1.0
    return float(len(xs) / max(hull.volume, 1e-9))


def _reference_find_shapes(
    rgb: np.ndarray, fg: np.ndarray, labels: np.ndarray, unit: float, min_area: float
) -> tuple[list[DetectedShape], np.ndarray]:
    regrow = _disk(max(1, round(3 * unit)))
    palette_idx, names = _reference_nearest_colour(rgb, SHAPE_COLOURS)
    shapes = []
    claimed = np.zeros_like(fg)
    for i in range(1, int(labels.max()) + 1):
        seed = labels == i
        if seed.sum() < min_area * 0.5:
            continue
        region = fg & ndimage.binary_dilation(seed, regrow)
        region_labels, _ = ndimage.label(region)
        region = np.isin(region_labels, np.unique(region_labels[seed & region]))
        area = int(region.sum())
        if area < min_area:
            continue
        claimed |= region
        inner = ndimage.binary_erosion(seed, _disk(1)) if seed.sum() > 30 * unit * unit else seed
        votes = np.bincount(palette_idx[inner if inner.any() else seed], minlength=len(names))
        ys, xs = np.nonzero(region)
        contact = max(
            int(region[0, :].sum()),
            int(region[-1, :].sum()),
            int(region[:, 0].sum()),
            int(region[:, -1].sum()),
        )
        shapes.append(
            DetectedShape(
                kind=_classify_kind(region),
                colour=names[int(np.argmax(votes))],
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                area=area,
                centre=(float(xs.mean()), float(ys.mean())),
                border_contact=contact,
            )
        )
    return shapes, claimed


def _reference_edge_width(rgb: np.ndarray, unit: float, where: np.ndarray) -> float:
    grad = np.zeros(rgb.shape[:2])
    spread = np.zeros(rgb.shape[:2])
    window = 2 * max(2, round(3 * unit)) + 1
    for c in range(3):
        channel = rgb[..., c]
        gx = ndimage.sobel(channel, axis=1) / 8.0
        gy = ndimage.sobel(channel, axis=0) / 8.0
        grad = np.maximum(grad, np.hypot(gx, gy))
        spread = np.maximum(
            spread, ndimage.maximum_filter(channel, window) - ndimage.minimum_filter(channel, window)
        )
    strong = (spread > 0.3) & (grad > 0.02) & where
    if strong.sum() < 4:
        return 0.0
    width = spread[strong] / grad[strong]
    return float(np.percentile(width, 10) / unit)


def _reference_overlay_scores(
    rgb: np.ndarray, thin: np.ndarray, t: np.ndarray, ends: tuple[np.ndarray, np.ndarray], unit: float
) -> dict[str, float]:
    a, b = ends
    nearest_bg = a + t[..., None] * (b - a)
    h, w = thin.shape
    scores = {"text": 0.0, "watermark": 0.0, "signature": 0.0}
    if not thin.any():
        return scores
    alpha = np.zeros((h, w))
    for ink in (0.0, 1.0):
        direction = ink - nearest_bg
        norm = np.maximum((direction**2).sum(axis=-1), 1e-3)
        alpha = np.maximum(alpha, ((rgb - nearest_bg) * direction).sum(axis=-1) / norm)
    merged = ndimage.binary_dilation(thin, _disk(max(1, round(2.5 * unit))))
    labels, n = ndimage.label(merged)
    area = float(h * w)
    for i in range(1, n + 1):
        member = (labels == i) & thin
        share = 100.0 * member.sum() / area
        if share < 0.15:
            continue
        ys, xs = np.nonzero(member)
        x0, x1 = np.percentile(xs, [3, 97])
        cy, cx = ys.mean(), xs.mean()
        width = (x1 - x0 + 1) / w
        opacity = float(np.percentile(alpha[member], 80))
        if opacity < 0.72:
            scores["watermark"] = max(scores["watermark"], share)
            continue
        in_band = cy < 0.3 * h or cy > 0.7 * h
        in_corner = (cx < 0.45 * w or cx > 0.55 * w) and in_band
        if width >= 0.45 and in_band:
            scores["text"] = max(scores["text"], share)
        elif in_corner and width < 0.55:
            scores["signature"] = max(scores["signature"], share)
        else:
            scores["text"] = max(scores["text"], share * 0.5)
    return scores


_JPEG_GHOST_SCORE = detector._jpeg_ghost_score


def _reference_jpeg_ghost_score(rgb: np.ndarray, levels: np.ndarray | None = None) -> float:
    return _JPEG_GHOST_SCORE(rgb)  # rounds rgb back to levels itself


def _reference_step(name: str) -> Callable[..., Any]:
    """The reference for one of the detector's steps, with the fast step's signature."""
    if name == "_line_profile_residual":
        return lambda rgb, usable, levels=None: _reference_line_profile_residual(rgb, usable)
    if name in ("_radial_harmonics", "_solidity"):
        reference = _reference_radial_harmonics if name == "_radial_harmonics" else _reference_solidity

        def whole_picture(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> Any:
            assert origin == (0, 0), "the reference steps pass whole-picture masks"
            return reference(mask)

        return whole_picture
    return {
        "_nearest_colour": _reference_nearest_colour,
        "_find_shapes": _reference_find_shapes,
        "_edge_width": _reference_edge_width,
        "_overlay_scores": _reference_overlay_scores,
        "_jpeg_ghost_score": _reference_jpeg_ghost_score,
        "_opened": ndimage.binary_opening,
        "_dilated": ndimage.binary_dilation,
    }[name]


REPLACED_STEPS = (
    "_nearest_colour",
    "_line_profile_residual",
    "_find_shapes",
    "_radial_harmonics",
    "_solidity",
    "_edge_width",
    "_overlay_scores",
    "_jpeg_ghost_score",
    "_opened",
    "_dilated",
)


# --- pictures -----------------------------------------------------------------------------------------

BACKGROUNDS = (
    Background("solid", ("white",)),
    Background("solid", ("black",)),
    Background("gradient", ("blue", "white"), angle=45.0),
    Background("stripes", ("green", "black"), angle=0.0, period=0.25),
    Background("stripes", ("red", "yellow"), angle=45.0, period=0.3),
    Background("stripes", ("purple", "white"), angle=90.0, period=0.22),
    Background("stripes", ("orange", "blue"), angle=135.0, period=0.28),
)
OBJECT_SETS = (
    (
        ShapeObject("circle", "red", (0.35, 0.4), 0.17),
        ShapeObject("square", "blue", (0.72, 0.45), 0.14, 20.0),
    ),
    (ShapeObject("star", "white", (0.5, 0.45), 0.25, 12.0),),
    (
        ShapeObject("triangle", "purple", (0.25, 0.3), 0.15, 100.0),
        ShapeObject("circle", "green", (0.72, 0.3), 0.13),
        ShapeObject("star", "orange", (0.5, 0.74), 0.18, 200.0),
    ),
    (
        ShapeObject("circle", "yellow", (0.05, 0.45), 0.3),
        ShapeObject("square", "black", (0.8, 0.9), 0.2, 5.0),
    ),
)
DEFECT_SETS = (
    (),
    ("lowres",),
    ("blurry",),
    ("jpeg artifacts",),
    ("watermark",),
    ("text",),
    ("signature",),
    ("cropped",),
    ("text", "jpeg artifacts"),
    ("watermark", "blurry"),
)


def _world(index: int, size: int = 64) -> Image.Image:
    scene = Scene(
        OBJECT_SETS[index % len(OBJECT_SETS)],
        BACKGROUNDS[index % len(BACKGROUNDS)],
        DEFECT_SETS[index % len(DEFECT_SETS)],
        detail_seed=index,
    )
    return render(scene, size)


def _pictures() -> Iterator[tuple[str, Image.Image, int]]:
    """(name, picture, native size): every background kind and defect at 64 px, then the same worlds
    softened, resized (also to 64x256 and 256x64) and blurred, read at native 64 or 128."""
    for i in range(18):  # every background, every defect set
        yield f"world {i}", _world(i), 64
    for i in range(4):
        yield f"vae stand-in {i}", vae_standin(_world(i + 3)), 64
    for i in range(4):
        yield f"world {i} at 128", _world(i + 5, 128), 128
    for i in range(4):
        yield f"128x128 resized {i}", _world(i + 9).resize((128, 128), Image.Resampling.BICUBIC), 64
    for i in range(3):
        yield f"256x256 resized {i}", _world(i + 2).resize((256, 256), Image.Resampling.BICUBIC), 128
    for i in range(2):
        tall = _world(i + 6).resize((64, 256), Image.Resampling.BICUBIC)
        yield f"64x256 {i}", tall, 64
        yield f"256x64 {i}", tall.transpose(Image.Transpose.ROTATE_90), 64
    for i in range(3):
        yield f"blurred {i}", _world(i + 11, 128).filter(ImageFilter.GaussianBlur(1.5)), 128


PICTURES = list(_pictures())


def _rgb(picture: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    levels = np.asarray(picture.convert("RGB"))
    return levels.astype(np.float64) / 255.0, levels


def _same(fast: np.ndarray, reference: np.ndarray) -> None:
    """Equal bit for bit: same dtype, shape and bytes."""
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    assert np.asarray(fast).tobytes() == np.asarray(reference).tobytes()


def _same_float(fast: float, reference: float) -> None:
    assert np.float64(fast).tobytes() == np.float64(reference).tobytes(), (fast, reference)


# --- steps --------------------------------------------------------------------------------------------


def test_pixels_from_levels_are_the_levels_over_255_and_round_back() -> None:
    levels = np.arange(256, dtype=np.uint8)
    via_pil = np.asarray(Image.fromarray(np.stack([levels] * 3, -1)[None]), dtype=np.float64)[0, :, 0] / 255.0
    _same(levels.astype(np.float64) / 255.0, via_pil)
    _same(detector._LEVEL_VALUES, via_pil)
    assert np.array_equal(np.clip(np.rint(via_pil * 255.0), 0, 255).astype(np.uint8), levels)


@pytest.mark.parametrize("shape", [(16, 16), (17, 40), (64, 64), (128, 64), (64, 256), (3, 1)])
def test_line_indices_are_np_unique_inverse(shape: tuple[int, int]) -> None:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    for (inverse, count), key in zip(detector._line_indices(h, w), (xx, yy, xx + yy, xx - yy), strict=True):
        lines, expected = np.unique(key.ravel(), return_inverse=True)
        _same(inverse, expected)
        assert count == len(lines)


@pytest.mark.parametrize("seed", range(6))
def test_line_medians_by_counting_levels_are_np_median(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 40))
    n = int(rng.integers(1, 400))
    # Few lines (long ones), missing lines, and few distinct levels (ties) as well as many.
    members = rng.integers(0, max(1, count - 3), n) if seed % 2 else rng.integers(0, count, n)
    levels = rng.integers(0, 256 if seed < 3 else 4, (n, 3)).astype(np.uint8)
    pixels = levels.astype(np.float64) / 255.0
    expected = _reference_line_medians(members, pixels, count)
    _same(detector._line_medians(members, pixels, count, levels), expected)
    _same(detector._line_medians(members, pixels, count), expected)  # the sorting path, any values


def test_line_medians_of_values_off_the_levels_sort() -> None:
    rng = np.random.default_rng(5)
    members = rng.integers(0, 9, 200)
    pixels = rng.normal(size=(200, 3))
    _same(detector._line_medians(members, pixels, 10), _reference_line_medians(members, pixels, 10))


@pytest.mark.parametrize("index", [0, 3, 4, 5, 6])
@pytest.mark.parametrize("hole", ["none", "shape", "empty", "all but a corner"])
def test_line_profile_residual(index: int, hole: str) -> None:
    rgb, levels = _rgb(_world(index, 48))
    usable = np.ones(rgb.shape[:2], dtype=bool)
    if hole == "shape":
        usable[10:30, 5:40] = False
    elif hole == "empty":
        usable[:] = False
    elif hole == "all but a corner":  # most lines have no usable pixel: their residual is inf
        usable[:] = False
        usable[:6, :7] = True
    expected = _reference_line_profile_residual(rgb, usable)
    _same(detector._line_profile_residual(rgb, usable, levels), expected)
    _same(detector._line_profile_residual(rgb, usable), expected)


@pytest.mark.parametrize("index", range(4))
def test_palette_index_of_some_pixels_is_that_of_the_whole_picture(index: int) -> None:
    rgb, _ = _rgb(vae_standin(_world(index, 64)))
    expected, names = _reference_nearest_colour(rgb, SHAPE_COLOURS)
    fast, fast_names = detector._nearest_colour(rgb, SHAPE_COLOURS)
    _same(fast, expected)
    assert fast_names == names
    lab = detector._RowLab(rgb)
    rng = np.random.default_rng(index)
    for _ in range(3):  # rows converted earlier are reused, new ones converted
        ys, xs = rng.integers(0, 64, 50), rng.integers(0, 64, 50)
        _same(detector._nearest_in_lab(lab.at(ys, xs), tuple(SHAPE_COLOURS)), expected[ys, xs])


@pytest.mark.parametrize("seed", range(8))
def test_windowed_openings_and_dilations_are_whole_picture_ones(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 50), dtype=bool)
    if seed:  # the first one stays empty
        y, x = int(rng.integers(-5, 40)), int(rng.integers(-5, 50))  # reaching the border at times
        blob = (slice(max(y, 0), y + 12), slice(max(x, 0), x + 15))
        mask[blob] = rng.random((40, 50))[blob] < 0.8
    for structure in (_disk(1), _disk(2), _disk(3), np.ones((2, 2), dtype=bool)):
        _same(detector._opened(mask, structure), ndimage.binary_opening(mask, structure))
        _same(detector._dilated(mask, structure), ndimage.binary_dilation(mask, structure))


def _shape_masks() -> Iterator[np.ndarray]:
    for index in range(8):
        for shape in _world(index, 64).split()[:1]:
            grey = np.asarray(shape)
            labels, n = ndimage.label(np.abs(grey.astype(int) - int(np.median(grey))) > 40)
            for i in range(1, n + 1):
                if (labels == i).sum() >= 3:
                    yield labels == i
    yield np.zeros((20, 20), dtype=bool) | (np.arange(20) == 0)[:, None]  # one row along the border
    corner = np.zeros((20, 20), dtype=bool)
    corner[:5, :7] = True
    yield corner


def test_shape_measures_in_a_window_are_those_of_the_whole_picture() -> None:
    masks = list(_shape_masks())
    assert len(masks) > 10
    for mask in masks:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        for pad in (0, 2):
            y0, x0 = max(int(rows[0]) - pad, 0), max(int(cols[0]) - pad, 0)
            window = mask[y0 : int(rows[-1]) + 1 + pad, x0 : int(cols[-1]) + 1 + pad]
            _same(detector._radial_harmonics(window, (y0, x0)), _reference_radial_harmonics(mask))
            _same_float(detector._solidity(window, (y0, x0)), _reference_solidity(mask))
            assert _classify_kind(window, (y0, x0)) == _classify_kind(mask)


class _Steps(NamedTuple):
    """What `detect` hands its steps for one picture, computed with the reference steps."""

    rgb: np.ndarray
    levels: np.ndarray
    unit: float
    fg: np.ndarray
    labels: np.ndarray
    t: np.ndarray
    ends: tuple[np.ndarray, np.ndarray]
    min_area: float


def _steps(picture: Image.Image, native: int) -> _Steps:
    config = DetectorConfig(native_size=native)
    unit = config.unit
    rgb, levels = _rgb(picture)
    background = detector._fit_background(rgb)
    a, b = np.array(background.ends[0]), np.array(background.ends[1])
    dist, t = detector._segment_distance(rgb, a, b)
    fg = dist > config.fg_threshold
    peak = ndimage.maximum_filter(dist, 2 * max(2, round(3 * unit)) + 1)
    core = ndimage.binary_opening(fg & (dist > 0.5 * peak), _disk(max(1, round(2 * unit))))
    labels, _ = ndimage.label(core)
    return _Steps(rgb, levels, unit, fg, labels, t, (a, b), config.min_shape_area * unit * unit)


@pytest.mark.parametrize(("name", "picture", "native"), PICTURES[::3], ids=[p[0] for p in PICTURES[::3]])
def test_shapes_edges_and_overlays_match_the_references(name: str, picture: Image.Image, native: int) -> None:
    s = _steps(picture, native)
    shapes, claimed = detector._find_shapes(s.rgb, s.fg, s.labels, s.unit, s.min_area)
    expected_shapes, expected_claimed = _reference_find_shapes(s.rgb, s.fg, s.labels, s.unit, s.min_area)
    assert shapes == expected_shapes and repr(shapes) == repr(expected_shapes)
    _same(claimed, expected_claimed)
    for radius in (0, 1, 3):
        where = ndimage.binary_dilation(claimed, _disk(radius)) if radius else claimed
        _same_float(detector._edge_width(s.rgb, s.unit, where), _reference_edge_width(s.rgb, s.unit, where))
    thin = s.fg & ~claimed
    fast = detector._overlay_scores(s.rgb, thin, s.t, s.ends, s.unit)
    assert repr(fast) == repr(_reference_overlay_scores(s.rgb, thin, s.t, s.ends, s.unit))
    _same_float(detector._jpeg_ghost_score(s.rgb, s.levels), _reference_jpeg_ghost_score(s.rgb))


def test_edge_width_without_enough_edge_pixels() -> None:
    rgb, _ = _rgb(_world(0))
    for n in (0, 1, 3, 4):
        where = np.zeros(rgb.shape[:2], dtype=bool)
        where.ravel()[np.linspace(0, where.size - 1, n).astype(int)] = True
        _same_float(detector._edge_width(rgb, 1.0, where), _reference_edge_width(rgb, 1.0, where))


# --- the whole detector -------------------------------------------------------------------------------


def _reference_detect(
    picture: Image.Image, config: DetectorConfig, monkeypatch: pytest.MonkeyPatch
) -> Detection:
    with monkeypatch.context() as patch:
        for name in REPLACED_STEPS:
            patch.setattr(detector, name, _reference_step(name))
        return detect(picture, config)


def _assert_same_detection(fast: Detection, expected: Detection) -> None:
    assert fast.shapes == expected.shapes and repr(fast.shapes) == repr(expected.shapes)
    assert fast.background == expected.background and repr(fast.background) == repr(expected.background)
    assert list(fast.defects) == list(expected.defects)
    for defect, score in expected.defects.items():
        _same_float(fast.defects[defect], score)
    assert fast.defect_flags == expected.defect_flags


def test_the_pictures_cover_every_background_kind_defect_and_size() -> None:
    kinds = {bg.kind for bg in BACKGROUNDS}
    angles = {bg.angle for bg in BACKGROUNDS if bg.kind == "stripes"}
    defects = {d for ds in DEFECT_SETS for d in ds}
    sizes = {p.size for _, p, _ in PICTURES}
    assert kinds == {"solid", "gradient", "stripes"} and angles == {0.0, 45.0, 90.0, 135.0}
    assert defects == set(detector.DEFECTS)
    assert {(64, 64), (128, 128), (256, 256), (64, 256), (256, 64)} <= sizes
    assert len(PICTURES) >= 40


@pytest.mark.parametrize(("name", "picture", "native"), PICTURES, ids=[p[0] for p in PICTURES])
def test_detect_equals_the_detect_of_reference_steps(
    name: str, picture: Image.Image, native: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = DetectorConfig(native_size=native)
    fast = detect(picture, config)
    expected = _reference_detect(picture, config, monkeypatch)
    _assert_same_detection(fast, expected)


def test_the_reference_detect_runs_the_reference_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replaced step is reached (so a renamed step cannot leave the reference detect fast)."""
    called: set[str] = set()
    for name in REPLACED_STEPS:
        step = _reference_step(name)

        def counted(*args: Any, _name: str = name, _step: Callable[..., Any] = step, **kwargs: Any) -> Any:
            called.add(_name)
            return _step(*args, **kwargs)

        monkeypatch.setattr(detector, name, counted)
    # Shapes on a solid background, and text on stripes: every step has work to do.
    for index in (0, 5):
        detect(_world(index), DetectorConfig())
    assert called == set(REPLACED_STEPS)

"""The miniature model's world: seeded, captioned pictures of simple shapes.

Every picture is a `Scene` (shapes, background, defects) drawn by `render` and described by
`caption` with Danbooru-style tags in shuffled order. Geometry is stored in fractions of the image
side, so one scene renders at any square size; the defaults are tuned for 64 px, the size the
miniature model trains at (8x8 latents), and every pixel quantity scales with the size.

Vocabulary (see `TAG_VOCABULARY`):

- count: ``solo`` / ``2shapes`` / ``3shapes`` (the world's ``1girl``);
- one ``<colour> <shape>`` per distinct object (tags are a set, as on Danbooru: two red circles
  give one ``red circle`` tag; the count tag carries the number);
- background: ``<colour> background`` for solid ones (``white background``, ``black background``,
  ``red background`` ...), ``gradient background``, ``striped background``;
- defects, each drawn big enough to survive an f=8 VAE at 64 px: ``lowres`` (4x box-down then
  nearest-up: pixelated, distinct from blur), ``blurry`` (Gaussian, sigma = 4% of the side),
  ``jpeg artifacts`` (JPEG quality 5-10), ``watermark`` (large semi-transparent word across the
  middle), ``text`` (an opaque word in a band at the top or bottom), ``signature`` (a thick scribble
  in a corner), ``cropped`` (a zoomed shape cut by the border);
- quality, so the NovelAI negative list's quality tags mean something here: no defect ->
  ``best quality``; one overlay defect (watermark, text, signature) -> ``normal quality``; one
  degrading defect (lowres, blurry, jpeg artifacts, cropped) or two overlays -> ``low quality``;
  two defects including a degrading one -> ``worst quality``;
- co-tags as Danbooru has them: ``username`` beside half the ``watermark`` tags, ``artist name``
  beside half the ``signature`` tags (a caption-level correlation: the picture is the same).

The negative list's human tags (``bad anatomy``, ``bad hands``, ``missing fingers``,
``extra digit``, ``fewer digits``, ``error``) never occur in this world on purpose: as in the study,
they reach the model as words it has not learned, so they only perturb the conditioning.
Objects never overlap each other (the detector counts connected regions); only ``cropped`` scenes
have shapes touching the border. Fewer objects are drawn bigger; ``WorldConfig.min_radius`` can keep
chosen kinds above a size (a scene is then laid out again, up to 8 times, rather than shrink one).
Shapes are turned at random; ``WorldConfig(upright=True)`` draws the same scenes with every shape in
one orientation (`UPRIGHT_ROTATION`), for the trainer's ``--upright-from``.
"""

from __future__ import annotations

import io
import math
import multiprocessing
from collections.abc import Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from voidprompt.errors import VoidpromptError

__all__ = [
    "BACKGROUND_COLOURS",
    "DEFECTS",
    "DEGRADING_DEFECTS",
    "OVERLAY_DEFECTS",
    "PALETTE",
    "QUALITY_TAGS",
    "SHAPE_COLOURS",
    "SHAPE_KINDS",
    "TAG_VOCABULARY",
    "UPRIGHT_ROTATION",
    "Background",
    "Scene",
    "ShapeObject",
    "WorldConfig",
    "WorldError",
    "caption",
    "count_tag",
    "draw",
    "draw_pixels",
    "make_dataset",
    "quality_tag",
    "render",
    "sample_scene",
    "scene_tags",
]


class WorldError(VoidpromptError):
    """A world setting or scene is invalid (size too small, unknown colour or shape, ...)."""


# Hues far apart so that they stay distinct after the VAE's blur and colour drift; the closest pair
# (orange, yellow) is still 90 apart in 8-bit RGB and 20+ apart in CIELAB.
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 20, 20),
        "orange": (255, 140, 0),
        "yellow": (255, 230, 0),
        "green": (20, 170, 40),
        "blue": (20, 60, 230),
        "purple": (150, 30, 200),
        "white": (255, 255, 255),
        "black": (0, 0, 0),
    }
)
CHROMATIC = ("red", "orange", "yellow", "green", "blue", "purple")
SHAPE_COLOURS = (*CHROMATIC, "white", "black")
BACKGROUND_COLOURS = (*CHROMATIC, "white", "black")
SHAPE_KINDS = ("circle", "square", "triangle", "star")
OVERLAY_DEFECTS = ("watermark", "text", "signature")
DEGRADING_DEFECTS = ("lowres", "blurry", "jpeg artifacts", "cropped")
DEFECTS = ("lowres", "blurry", "jpeg artifacts", "watermark", "text", "signature", "cropped")
QUALITY_TAGS = ("best quality", "normal quality", "low quality", "worst quality")
COUNT_TAGS = ("solo", "2shapes", "3shapes")
BACKGROUND_KINDS = ("solid", "gradient", "stripes")
# The star's inner radius as a fraction of the outer one: fat enough that its points survive blur.
STAR_INNER_RATIO = 0.5

TAG_VOCABULARY: frozenset[str] = frozenset(
    {
        *COUNT_TAGS,
        *(f"{c} {k}" for c in SHAPE_COLOURS for k in SHAPE_KINDS),
        *(f"{c} background" for c in BACKGROUND_COLOURS),
        "gradient background",
        "striped background",
        *DEFECTS,
        *QUALITY_TAGS,
        "username",
        "artist name",
    }
)

# A 5x7 bitmap font drawn by us rather than a Pillow font: identical pixels on every Pillow version.
_GLYPHS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
        "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
        "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
        "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
        "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
        "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
        "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
        "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
        "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
        "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
        "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
        "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
        "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
        "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
        "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
        "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
        "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
        "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
        "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
        "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
        "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
        "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
        "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
        "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
        "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    }
)
_LETTERS = "".join(sorted(_GLYPHS))


@dataclass(frozen=True)
class ShapeObject:
    """One shape. `centre` is (x, y) and `size` the circumradius, both in fractions of the side."""

    kind: str
    colour: str
    centre: tuple[float, float]
    size: float
    rotation: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise WorldError(f"unknown shape kind {self.kind!r}; use one of {', '.join(SHAPE_KINDS)}")
        if self.colour not in PALETTE:
            raise WorldError(f"unknown colour {self.colour!r}; use one of {', '.join(PALETTE)}")
        if not 0.0 < self.size < 1.0:
            raise WorldError(f"shape size {self.size} is not a fraction of the side in (0, 1)")

    @property
    def tag(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Background:
    """`solid`: colours=(c,); `gradient`: colours=(from, to) along `angle` degrees;
    `stripes`: two alternating colours, stripes perpendicular to `angle`, `period` a fraction of the side."""

    kind: str
    colours: tuple[str, ...]
    angle: float = 0.0
    period: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise WorldError(f"unknown background kind {self.kind!r}; use one of {BACKGROUND_KINDS}")
        want = 1 if self.kind == "solid" else 2
        if len(self.colours) != want or any(c not in PALETTE for c in self.colours):
            raise WorldError(f"a {self.kind} background needs {want} palette colour(s), got {self.colours}")

    @property
    def tag(self) -> str:
        if self.kind == "solid":
            return f"{self.colours[0]} background"
        return "gradient background" if self.kind == "gradient" else "striped background"


@dataclass(frozen=True)
class Scene:
    """What one picture shows. `detail_seed` fixes the defects' own randomness (words, scribbles,
    JPEG quality), so `render(scene, size)` is a pure function of the scene."""

    objects: tuple[ShapeObject, ...]
    background: Background
    defects: tuple[str, ...] = ()
    detail_seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise WorldError(f"a scene holds 1-3 objects, got {len(self.objects)}")
        unknown = [d for d in self.defects if d not in DEFECTS]
        if unknown:
            raise WorldError(f"unknown defect(s) {unknown}; use some of {', '.join(DEFECTS)}")


@dataclass(frozen=True)
class WorldConfig:
    """Sampling knobs. Defaults give ~38% of pictures 1-2 defects, roughly balanced per defect."""

    size: int = 64
    count_probs: tuple[float, float, float] = (0.45, 0.35, 0.20)
    background_probs: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(
            {"white": 0.28, "black": 0.14, "colour": 0.20, "gradient": 0.19, "stripes": 0.19}
        )
    )
    defect_prob: float = 0.38
    two_defect_prob: float = 0.3
    # Circumradius ranges (fraction of the side) by object count: fewer objects, bigger ones.
    radius_ranges: tuple[tuple[float, float], ...] = ((0.17, 0.30), (0.13, 0.22), (0.11, 0.18))
    # The smallest circumradius per kind, whatever the count, e.g. {"star": 0.22, "square": 0.15}:
    # a 64 px miniature model's VAE reads smaller stars and squares back as blobs. Empty by default:
    # the world the shipped model was trained on. A model trained on the floored world drew stars no
    # better (docs/miniature-history.md).
    min_radius: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    gap: float = 0.04
    supersample: int = 4
    # Every shape in one orientation (`UPRIGHT_ROTATION`: squares axis-aligned, triangles and stars
    # pointing up) instead of a random one. The rotation is still drawn, so an upright world holds the
    # same scenes as the free one, only turned. The miniature model's last diffusion steps use it: at
    # 8x8 latents a 4M-parameter UNet paints randomly turned squares and stars as round blobs.
    upright: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        # A MappingProxyType cannot be pickled, and draw_pixels sends configs to worker processes:
        # pickle plain dicts and wrap them again on the other side.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return (_world_config, ({k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items()},))

    def __post_init__(self) -> None:
        if self.size < 32:
            raise WorldError(f"size {self.size} is too small for legible shapes; use 32 or more (64 default)")
        if abs(sum(self.count_probs) - 1.0) > 1e-6 or abs(sum(self.background_probs.values()) - 1.0) > 1e-6:
            raise WorldError("count_probs and background_probs must each sum to 1")
        unknown = sorted(set(self.min_radius) - set(SHAPE_KINDS))
        if unknown or not all(0.0 <= r < 0.5 for r in self.min_radius.values()):
            raise WorldError(
                f"min_radius {dict(self.min_radius)}: keys must be shape kinds ({', '.join(SHAPE_KINDS)}) "
                "and values circumradii in [0, 0.5)"
            )


def _world_config(values: dict[str, Any]) -> WorldConfig:
    rebuilt: dict[str, Any] = {
        k: MappingProxyType(v) if isinstance(v, dict) else v for k, v in values.items()
    }
    return WorldConfig(**rebuilt)


# The orientation of every kind in an upright world (degrees, y down: -90 points up).
UPRIGHT_ROTATION: Mapping[str, float] = MappingProxyType(
    {"circle": 0.0, "square": 0.0, "triangle": -90.0, "star": -90.0}
)

# Shapes look about equally big for the same visual weight when stars and triangles get a larger
# circumradius than circles and squares.
_KIND_SCALE: Mapping[str, float] = MappingProxyType(
    {"circle": 0.9, "square": 1.0, "triangle": 1.12, "star": 1.2}
)


def _choose(rng: np.random.Generator, items: tuple[str, ...] | list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _sample_background(rng: np.random.Generator, config: WorldConfig) -> Background:
    names = list(config.background_probs)
    pick = names[int(rng.choice(len(names), p=np.array([config.background_probs[n] for n in names])))]
    if pick in ("white", "black"):
        return Background("solid", (pick,))
    if pick == "colour":
        return Background("solid", (_choose(rng, CHROMATIC),))
    colour = _choose(rng, CHROMATIC)
    other = _choose(rng, ("white", "black"))
    if pick == "gradient":
        pair = (colour, other) if rng.random() < 0.5 else (other, colour)
        return Background("gradient", pair, angle=float(rng.integers(8)) * 45.0)
    return Background(
        "stripes", (colour, other), angle=float(rng.integers(4)) * 45.0, period=float(rng.uniform(0.22, 0.32))
    )


def _sample_defects(rng: np.random.Generator, config: WorldConfig) -> tuple[str, ...]:
    if rng.random() >= config.defect_prob:
        return ()
    first = _choose(rng, DEFECTS)
    if rng.random() >= config.two_defect_prob:
        return (first,)
    # Pixelation under a strong blur is no longer visible, so the two never come together.
    clash = {"lowres": "blurry", "blurry": "lowres"}.get(first)
    rest = [d for d in DEFECTS if d != first and d != clash]
    return (first, _choose(rng, rest))


def _place(
    rng: np.random.Generator, placed: list[tuple[float, float, float]], r: float, gap: float, cut: bool
) -> tuple[float, float] | None:
    for _ in range(60):
        if cut:
            # Centre between 5% and 55% of the radius inside one edge: 50-80% of the shape is visible.
            inside = r * float(rng.uniform(0.05, 0.55))
            # Along the edge the shape may reach a corner; only keep its centre off the other edges.
            along = float(rng.uniform(min(0.5, r * 0.6), max(0.5, 1.0 - r * 0.6)))
            side = int(rng.integers(4))
            x, y = [(inside, along), (1.0 - inside, along), (along, inside), (along, 1.0 - inside)][side]
        else:
            lo, hi = r + gap, 1.0 - r - gap
            if lo >= hi:
                return None
            x, y = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        if all(math.hypot(x - px, y - py) > r + pr + gap for px, py, pr in placed):
            return (x, y)
    return None


# Whole layouts tried before one with a shrunk or missing shape is kept (worlds with a `min_radius`).
_LAYOUT_TRIES = 8

# One shape before placement: kind, colour, cut (the cropped scene's zoomed shape), radius, rotation.
_Plan = tuple[str, str, bool, float, float]


def _plan_shape(
    rng: np.random.Generator, config: WorldConfig, allowed: list[str], radii: tuple[float, float], cut: bool
) -> _Plan:
    kind = _choose(rng, SHAPE_KINDS)
    colour = _choose(rng, allowed)
    r = max(float(rng.uniform(*radii)) * _KIND_SCALE[kind], config.min_radius.get(kind, 0.0))
    if cut:  # a zoomed-in crop: the cut shape is bigger than its peers
        r = min(0.36, r * 1.3)
    rotation = float(rng.uniform(0.0, 360.0))
    if config.upright:
        rotation = UPRIGHT_ROTATION[kind]
    return kind, colour, cut, r, rotation


def _put(
    rng: np.random.Generator, placed: list[tuple[float, float, float]], plan: _Plan, gap: float
) -> ShapeObject | None:
    """Place one shape among `placed` (appended to it); shrunk until it fits, None below 0.06."""
    kind, colour, cut, r, rotation = plan
    spot = None
    while spot is None and r > 0.06:
        spot = _place(rng, placed, r, gap, cut)
        if spot is None:
            r *= 0.85
    if spot is None:
        return None
    placed.append((spot[0], spot[1], r))
    return ShapeObject(kind, colour, spot, r, rotation)


def sample_scene(rng: np.random.Generator, config: WorldConfig | None = None) -> Scene:
    """Draw one scene. All randomness comes from `rng`, in a fixed order."""
    config = config or WorldConfig()
    count = 1 + int(rng.choice(3, p=np.array(config.count_probs)))
    background = _sample_background(rng, config)
    defects = _sample_defects(rng, config)
    allowed = [c for c in SHAPE_COLOURS if c not in background.colours]
    radii = config.radius_ranges[count - 1]
    cropped = "cropped" in defects
    objects: list[ShapeObject | None] = []
    if not config.min_radius:
        # Each shape placed as it is drawn: the stream the shipped miniature model was trained on.
        placed: list[tuple[float, float, float]] = []
        for i in range(count):
            plan = _plan_shape(rng, config, allowed, radii, cropped and i == 0)
            objects.append(_put(rng, placed, plan, config.gap))
    else:
        plans = [_plan_shape(rng, config, allowed, radii, cropped and i == 0) for i in range(count)]
        # The cut shape first (it sits on an edge), then the biggest first: shapes that do not fit
        # are shrunk, and shrinking the small ones last keeps the floors more often; a layout that
        # still shrinks a shape below its floor or drops one is drawn again.
        plans.sort(key=lambda plan: (not plan[2], -plan[3]))
        for _ in range(_LAYOUT_TRIES):
            placed = []
            objects = [_put(rng, placed, plan, config.gap) for plan in plans]
            if all(o is not None and o.size >= config.min_radius.get(o.kind, 0.0) for o in objects):
                break
    detail_seed = int(rng.integers(2**31))
    return Scene(tuple(o for o in objects if o is not None), background, defects, detail_seed)


# --- rendering -------------------------------------------------------------------------------------


def _polygon(obj: ShapeObject, scale: float) -> list[tuple[float, float]]:
    cx, cy, r = obj.centre[0] * scale, obj.centre[1] * scale, obj.size * scale
    rot = math.radians(obj.rotation)
    if obj.kind == "square":
        angles, radii = [rot + k * math.pi / 2 + math.pi / 4 for k in range(4)], [r] * 4
    elif obj.kind == "triangle":
        angles, radii = [rot + k * 2 * math.pi / 3 for k in range(3)], [r] * 3
    else:  # star: ten vertices alternating outer and inner radius
        angles = [rot + k * math.pi / 5 for k in range(10)]
        radii = [r if k % 2 == 0 else r * STAR_INNER_RATIO for k in range(10)]
    return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii, strict=True)]


def _background_array(bg: Background, n: int) -> np.ndarray:
    """The background at n x n pixels as float RGB in 0..255."""
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    ys, xs = np.meshgrid(coords, coords, indexing="ij")
    first = np.array(PALETTE[bg.colours[0]], dtype=np.float64)
    if bg.kind == "solid":
        return np.broadcast_to(first, (n, n, 3)).copy()
    second = np.array(PALETTE[bg.colours[1]], dtype=np.float64)
    a = math.radians(bg.angle)
    proj = (xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a)
    if bg.kind == "gradient":
        # Normalised so the two colours are reached exactly at the extreme corners/edges.
        half = 0.5 * (abs(math.cos(a)) + abs(math.sin(a)))
        t = np.clip((proj + half) / (2 * half), 0.0, 1.0)
    else:
        t = (np.floor(proj / (bg.period / 2.0)) % 2).astype(np.float64)
    return first * (1.0 - t[..., None]) + second * t[..., None]


def _contrast_ink(image: np.ndarray) -> tuple[int, int, int]:
    """Black on light pictures, white on dark ones: overlays must stand out to be learnable."""
    luma = float((image[..., :3] @ np.array([0.299, 0.587, 0.114])).mean())
    return (0, 0, 0) if luma > 110 else (255, 255, 255)


def _text_mask(
    word: str, unit: float, n: int, origin: tuple[float, float], angle: float = 0.0
) -> Image.Image:
    """The word in the bitmap font, each font pixel `unit` canvas pixels, on an n x n "L" mask."""
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy = origin
    for i, ch in enumerate(word):
        for row, bits in enumerate(_GLYPHS[ch]):
            for col, bit in enumerate(bits):
                if bit == "#":
                    x0, y0 = ox + (i * 6 + col) * unit, oy + row * unit
                    draw.rectangle((x0, y0, x0 + unit - 1, y0 + unit - 1), fill=255)
    if angle:
        cx, cy = ox + (len(word) * 6 - 1) * unit / 2, oy + 3.5 * unit
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    return mask


def _word(rng: np.random.Generator, lo: int, hi: int) -> str:
    return "".join(_LETTERS[int(i)] for i in rng.integers(len(_LETTERS), size=int(rng.integers(lo, hi + 1))))


def _overlay_mask(defect: str, rng: np.random.Generator, n: int) -> tuple[Image.Image, float]:
    """An n x n mask of one overlay defect and its opacity."""
    if defect == "text":
        # Readable: glyphs about 16% of the side tall, in a band at the top or the bottom.
        unit = n / 28.0
        word = _word(rng, 3, 4)
        width = (len(word) * 6 - 1) * unit
        x = float(rng.uniform(0.03 * n, max(0.03 * n, n - width - 0.03 * n)))
        y = 0.04 * n if rng.random() < 0.5 else n - 7 * unit - 0.04 * n
        return _text_mask(word, unit, n, (x, y)), 1.0
    if defect == "watermark":
        # Big and see-through across the middle, as stock-photo watermarks are.
        unit = n / 19.0
        word = _word(rng, 2, 3)
        width = (len(word) * 6 - 1) * unit
        x = (n - width) / 2 + float(rng.uniform(-0.06, 0.06)) * n
        y = (n - 7 * unit) / 2 + float(rng.uniform(-0.12, 0.12)) * n
        return _text_mask(word, unit, n, (x, y), float(rng.uniform(-35.0, 35.0))), float(
            rng.uniform(0.4, 0.55)
        )
    # signature: a thick cursive-like scribble in a bottom (mostly) or top corner.
    mask = Image.new("L", (n, n), 0)
    w, h = 0.40 * n, 0.16 * n
    right, bottom = rng.random() < 0.65, rng.random() < 0.8
    x0 = n - w - 0.05 * n if right else 0.05 * n
    y0 = n - h - 0.05 * n if bottom else 0.05 * n
    k = int(rng.integers(4, 7))  # few strokes: a dense zigzag would fill in like a shape
    xs = x0 + np.sort(rng.uniform(0, w, size=k))
    ys = y0 + h * (
        0.5 + 0.5 * np.sin(np.arange(k) * 2.2 + rng.uniform(0, 6.28)) * rng.uniform(0.6, 1.0, size=k)
    )
    points = [(float(a), float(b)) for a, b in zip(xs, ys, strict=True)]
    points.append((x0 + w * float(rng.uniform(0.0, 0.3)), y0 + h * 1.05))  # the flourish back
    ImageDraw.Draw(mask).line(points, fill=255, width=max(2, round(n / 24)), joint="curve")
    return mask, 1.0


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene as a size x size RGB picture (anti-aliased by supersampling)."""
    if size < 32:
        raise WorldError(f"size {size} is too small for legible shapes; use 32 or more (64 default)")
    if supersample < 1:
        raise WorldError(f"supersample must be 1 or more, got {supersample}")
    n = size * supersample
    canvas = Image.fromarray(np.round(_background_array(scene.background, n)).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        fill = PALETTE[obj.colour]
        if obj.kind == "circle":
            cx, cy, r = obj.centre[0] * n, obj.centre[1] * n, obj.size * n
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj, n), fill=fill)
    image = canvas.reduce(supersample) if supersample > 1 else canvas

    defect_rngs = {d: np.random.default_rng([scene.detail_seed, i]) for i, d in enumerate(DEFECTS)}
    if "lowres" in scene.defects:
        factor = max(2, size // 16)
        small = image.resize((max(1, size // factor),) * 2, Image.Resampling.BOX)
        image = small.resize((size, size), Image.Resampling.NEAREST)
    if "blurry" in scene.defects:
        image = image.filter(ImageFilter.GaussianBlur(radius=0.04 * size))
    for defect in OVERLAY_DEFECTS:
        if defect in scene.defects:
            mask, alpha = _overlay_mask(defect, defect_rngs[defect], n)
            if supersample > 1:
                mask = mask.reduce(supersample)
            ink = Image.new("RGB", (size, size), _contrast_ink(np.asarray(image, dtype=np.float64)))
            weight = mask.point(lambda v, a=alpha: round(v * a))
            image = Image.composite(ink, image, weight)
    if "jpeg artifacts" in scene.defects:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(defect_rngs["jpeg artifacts"].integers(5, 11)))
        buffer.seek(0)
        image = Image.open(buffer).convert("RGB")
    return image


# --- captions ----------------------------------------------------------------------------------------


def count_tag(count: int) -> str:
    if not 1 <= count <= 3:
        raise WorldError(f"the world has count tags for 1-3 objects, got {count}")
    return COUNT_TAGS[count - 1]


def quality_tag(defects: tuple[str, ...] | list[str] | set[str] | frozenset[str]) -> str:
    """The NovelAI-style quality tag a picture with these defects earns (see the module docstring)."""
    degrading = sum(d in DEGRADING_DEFECTS for d in defects)
    if not defects:
        return "best quality"
    if len(defects) == 1:
        return "low quality" if degrading else "normal quality"
    return "worst quality" if degrading else "low quality"


def scene_tags(scene: Scene) -> list[str]:
    """The scene's tags in a canonical order (count, objects, background, defects, quality)."""
    tags = [count_tag(len(scene.objects))]
    for obj in scene.objects:
        if obj.tag not in tags:
            tags.append(obj.tag)
    tags.append(scene.background.tag)
    tags.extend(d for d in DEFECTS if d in scene.defects)
    tags.append(quality_tag(scene.defects))
    return tags


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Danbooru-style caption: the scene's tags plus co-tags, shuffled, joined by ", "."""
    tags = scene_tags(scene)
    if "watermark" in scene.defects and rng.random() < 0.5:
        tags.append("username")
    if "signature" in scene.defects and rng.random() < 0.5:
        tags.append("artist name")
    order = rng.permutation(len(tags))
    return ", ".join(tags[int(i)] for i in order)


def make_dataset(
    n: int, seed: int, size: int = 64, config: WorldConfig | None = None
) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Yield n (image, caption, scene) triples. Picture i depends only on (seed, i), so any prefix
    of a longer dataset is the shorter one and a run can resume at any index."""
    if n < 0:
        raise WorldError(f"n must be 0 or more, got {n}")
    config = config or WorldConfig(size=size)
    for i in range(n):
        yield draw(seed, i, config, size)


def draw(
    seed: int, index: int, config: WorldConfig | None = None, size: int | None = None
) -> tuple[Image.Image, str, Scene]:
    """Picture ``index`` of the world of ``seed``: the (image, caption, scene) ``make_dataset`` yields
    at that index, drawn on its own (so a stream of fresh pictures can start anywhere). ``size``
    defaults to the config's."""
    if index < 0:
        raise WorldError(f"index must be 0 or more, got {index}")
    config = config or WorldConfig()
    scene = sample_scene(np.random.default_rng([seed, index, 0]), config)
    text = caption(scene, np.random.default_rng([seed, index, 1]))
    return render(scene, size or config.size, config.supersample), text, scene


# Pictures per task of `draw_pixels`: big enough that a worker's start-up (a spawned interpreter
# importing numpy and Pillow, about a second) is small beside its drawing.
DRAW_CHUNK = 500


def draw_pixels(
    seed: int, n: int, config: WorldConfig | None = None, *, workers: int = 1
) -> tuple[np.ndarray, list[str]]:
    """Pictures 0 .. n-1 of the world of ``seed`` as one (n, size, size, 3) uint8 RGB array, and their
    captions: ``make_dataset``'s pictures, drawn in chunks of ``DRAW_CHUNK`` on up to ``workers``
    processes. Picture i depends only on (seed, i), so the result is the same for any ``workers``."""
    if n < 0:
        raise WorldError(f"n must be 0 or more, got {n}")
    if workers < 1:
        raise WorldError(f"workers must be 1 or more, got {workers}")
    config = config or WorldConfig()
    bounds = [(start, min(start + DRAW_CHUNK, n)) for start in range(0, n, DRAW_CHUNK)]
    workers = min(workers, len(bounds))
    if workers <= 1:
        parts = [_draw_chunk(seed, start, stop, config) for start, stop in bounds]
    else:
        # spawn, not fork: the caller (the trainer) holds torch's thread pools, which a fork copies
        # in whatever state they are.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = list(pool.map(_draw_chunk, *zip(*[(seed, a, b, config) for a, b in bounds], strict=True)))
    pixels = [p for p, _ in parts]
    captions = [c for _, chunk in parts for c in chunk]
    empty = np.empty((0, config.size, config.size, 3), dtype=np.uint8)
    return (np.concatenate(pixels) if pixels else empty), captions


def _draw_chunk(seed: int, start: int, stop: int, config: WorldConfig) -> tuple[np.ndarray, list[str]]:
    pixels = np.empty((stop - start, config.size, config.size, 3), dtype=np.uint8)
    captions = []
    for j, index in enumerate(range(start, stop)):
        image, text, _ = draw(seed, index, config)
        pixels[j] = np.asarray(image.convert("RGB"), dtype=np.uint8)
        captions.append(text)
    return pixels, captions

"""Image sizes for studies: the study brief's aspect512 helper, NovelAI's aspect-ratio buckets and
SDXL's.

``aspect512`` is the study author's ``node aspect512.js [w] [h]`` generalised to any area, base side
and unit (the demo study sizes the 128 px miniature model's pictures with ``base=128, unit=8``; an
SDXL study uses SDXL's 1024 base). ``nai_buckets`` follows the bucket list of
NovelAI/novelai-aspect-ratio-bucketing (MIT, ``BucketManager.gen_buckets``), re-derived from its
README and description, quirks included. :data:`SDXL_BUCKETS` is SDXL's list at 1024.
"""

from __future__ import annotations

import math
from fractions import Fraction

from voidprompt.errors import StudyError

Number = int | float | Fraction

# The side of each family's trained square: the unit area of its size helpers.
SD1_BASE = 512
SDXL_BASE = 1024
NAMED_BASES = {"sd1": SD1_BASE, "sdxl": SDXL_BASE}

# SDXL's nine standard sizes at 1024, (width, height): the square, then each landscape bucket and its
# portrait twin, aspect growing. Each is a bucket of SDXL's multi-aspect training (Podell et al. 2023,
# "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis", arXiv:2307.01952,
# section 2.3 and the table of appendix I: sides in multiples of 64, about 1024^2 pixels), and they
# are the nine sizes Stability's own SDXL 1.0 API accepted; UIs and trainers list them as "the SDXL
# resolutions".
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (1152, 896), (896, 1152),
    (1216, 832), (832, 1216),
    (1344, 768), (768, 1344),
    (1536, 640), (640, 1536),
)  # fmt: skip


def named_base(value: object) -> int:
    """A base side: a whole number of pixels, or a family's name (``"sd1"`` 512, ``"sdxl"`` 1024)."""
    if isinstance(value, str) and value.strip().lower() in NAMED_BASES:
        return NAMED_BASES[value.strip().lower()]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise StudyError(
        f"base={value!r}: write a whole number of pixels (e.g. base = 1024) or a model family: "
        + ", ".join(f'"{name}" ({side})' for name, side in NAMED_BASES.items())
    )


def _exact(value: Number, what: str) -> Fraction:
    """A number as an exact fraction; floats through their shortest repr, so 1.1 means 11/10."""
    if isinstance(value, bool) or not isinstance(value, int | float | Fraction):
        raise StudyError(f"{what}={value!r}: must be a number")
    exact = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    if exact <= 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise StudyError(f"{what}={value!r}: must be a positive number")
    return exact


def _floor_sqrt_units(square: Fraction, unit: int) -> int:
    """floor(sqrt(square) / unit) * unit, in exact arithmetic.

    For a whole number n, n <= sqrt(q) iff n*n <= q iff n*n <= floor(q), so integer square roots
    give the exact answer where float sqrt could land on 1023.9999 instead of 1024.
    """
    return math.isqrt(math.floor(square / (unit * unit))) * unit


def aspect512(w: Number, h: Number, area: Number = 1.0, base: int = 512, unit: int = 64) -> tuple[int, int]:
    """The largest size of about ``area`` x ``base``^2 pixels with aspect ``w:h``, in steps of ``unit``.

    width = floor(sqrt(base^2 * area * w / h) / unit) * unit, height likewise with h / w.
    Seed examples: ``aspect512(4, 3) == (576, 384)``, ``aspect512(16, 9) == (640, 384)``.
    Both sides round down, so the aspect is only approximately kept and the area never exceeds
    the request - the author's own note ("you usually unable to keep the expected aspect ratio").
    """
    ew, eh, earea = _exact(w, "w"), _exact(h, "h"), _exact(area, "area")
    if base <= 0 or unit <= 0:
        raise StudyError(f"base={base}, unit={unit}: both must be positive whole numbers of pixels")
    square = Fraction(base * base) * earea
    width = _floor_sqrt_units(square * ew / eh, unit)
    height = _floor_sqrt_units(square * eh / ew, unit)
    if width == 0 or height == 0:
        raise StudyError(
            f"aspect {w}:{h} at area {area} x {base}^2 gives {width}x{height}: a side is shorter than "
            f"one unit of {unit} px; use a less extreme aspect ratio or a larger area"
        )
    return width, height


def nai_buckets(
    max_area: int = 512 * 768,
    min_dim: int = 256,
    max_dim: int = 1024,
    step: int = 64,
    base_res: tuple[int, int] = (512, 512),
) -> list[tuple[int, int]]:
    """NovelAI's aspect-ratio buckets as (width, height), in NovelAI's order (w up, then h down).

    For every width from ``min_dim`` in ``step``s, the tallest height within ``max_area`` and
    ``max_dim``; the same with the roles swapped; duplicates removed. With the defaults this is
    the 19-bucket list printed in NovelAI's README.
    """
    if min(max_area, min_dim, max_dim, step) <= 0:
        raise StudyError(
            f"nai_buckets(max_area={max_area}, min_dim={min_dim}, max_dim={max_dim}, step={step}): "
            "all must be positive"
        )

    def fits(a: int, b: int) -> bool:
        # NovelAI compares latent cells (a/8)*(b/8) with max_tokens; for multiples of 8 that is a*b.
        return a * b <= max_area and b <= max_dim

    found: list[tuple[int, int]] = []
    for swapped in (False, True):
        first = min_dim
        while first * min_dim <= max_area and first <= max_dim:
            second = min_dim
            passed_base = False
            while fits(first, second + step):
                if (first, second) == base_res:
                    passed_base = True
                second += step
            size = (second, first) if swapped else (first, second)
            # NovelAI quirk: in the width-first pass only, a column that walked through the base
            # resolution on its way to a taller bucket also records the base bucket itself.
            if not swapped and passed_base and size != base_res:
                found.append(base_res)
            found.append(size)
            first += step
    unique = list(dict.fromkeys(found))
    # NovelAI's sort key, kept verbatim: width up, then height down while sides stay below 4096.
    return sorted(unique, key=lambda wh: wh[0] * 4096 - wh[1])

"""aspect512 and NovelAI buckets against the study brief's examples and NovelAI's published list."""

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab import aspect512, nai_buckets


@pytest.mark.parametrize(
    ("w", "h", "area", "expected"),
    [
        (4, 3, 1.0, (576, 384)),  # the study brief: node aspect512.js 4 3
        (16, 9, 1.0, (640, 384)),  # the study brief: node aspect512.js 16 9; sqrt(512^2*9/16) = 384 exactly
        (1, 1, 1.0, (512, 512)),
        (1, 1, 2.0, (704, 704)),  # sqrt(2)*512 = 724.1 -> 11 units
        (1, 1, 4.0, (1024, 1024)),  # exact square root: no 1023.999 rounding down
        (4, 3, 1.5, (704, 512)),  # sqrt(512^2*1.5*4/3) = 724.1, sqrt(512^2*1.5*3/4) = 543.1
        (1, 4, 1.0, (256, 1024)),
    ],
)
def test_aspect512(w: int, h: int, area: float, expected: tuple[int, int]) -> None:
    assert aspect512(w, h, area) == expected


def test_aspect512_miniature_world() -> None:
    # base 64, unit 8: sqrt(64^2*4/3) = 73.9 -> 72, sqrt(64^2*3/4) = 55.4 -> 48
    assert aspect512(4, 3, base=64, unit=8) == (72, 48)
    assert aspect512(1, 1, 4, base=64, unit=8) == (128, 128)


def test_aspect512_rejects_degenerate() -> None:
    with pytest.raises(StudyError, match="shorter than one unit"):
        aspect512(1, 100)
    with pytest.raises(StudyError, match="positive"):
        aspect512(0, 1)


# Copied from the "Sample Output" of NovelAI/novelai-aspect-ratio-bucketing's README.
NOVELAI_README = [
    (256, 1024), (320, 1024), (384, 1024), (384, 960), (384, 896), (448, 832), (512, 768), (512, 704),
    (512, 512), (576, 640), (640, 576), (704, 512), (768, 512), (832, 448), (896, 384), (960, 384),
    (1024, 384), (1024, 320), (1024, 256),
]  # fmt: skip


def test_nai_buckets_match_the_readme() -> None:
    assert nai_buckets() == NOVELAI_README
    assert len(NOVELAI_README) == 19


def test_nai_buckets_square_area_by_hand() -> None:
    # max area 512^2: for each width the tallest height h <= 262144 / w (multiple of 64, <= 1024);
    # the base bucket is reached exactly at w = 512, so the quirk adds nothing.
    expected = [
        (256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256),
    ]  # fmt: skip
    assert nai_buckets(max_area=512 * 512) == expected


def test_nai_base_bucket_quirk() -> None:
    # Without the quirk 512x512 would not be a bucket at the 512x768 area (no side reaches it).
    buckets = nai_buckets()
    assert (512, 512) in buckets
    assert buckets.count((512, 512)) == 1

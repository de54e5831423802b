"""Per-tag measures on hand-built explanations, against closed forms.

(The file is not test_measures.py: tests/lab has one, and test modules share one namespace.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from voidprompt.explain.measures import guidance_differences, peak, spread, tag_measures
from voidprompt.explain.record import CallInfo, Explanation, TagInfo

WINDOWS = ("all", "early", "middle", "late")


def explanation(tags: list[TagInfo], maps: np.ndarray, calls: tuple[CallInfo, ...] = ()) -> Explanation:
    return Explanation(
        latent_size=maps.shape[-2:],  # type: ignore[arg-type]
        windows=WINDOWS,
        window_calls={"all": (0, 1, 2), "early": (0,), "middle": (1,), "late": (2,)},
        tags=tuple(tags),
        tag_maps=maps.astype(np.float32),
        content_share={},
        calls=calls,
    )


def tag(branch: str, label: str, part: int = 0, weight: float = 1.0) -> TagInfo:
    return TagInfo(branch, part, label, weight, (label,))


def test_mass_share_is_the_tags_part_of_its_branch() -> None:
    tags = [tag("positive", "red"), tag("positive", "ball"), tag("positive", "cat", part=1)]
    tags += [tag("negative", "lowres"), tag("negative", "blurry", weight=1.2)]
    maps = np.zeros((5, 4, 4, 4))
    maps[0], maps[1], maps[2] = 1.0, 3.0, 0.5  # 16, 48 -> 1/4, 3/4; the AND part alone -> 1
    maps[3], maps[4] = 2.0, 2.0
    maps[3, :, 0, 0] = 18.0  # 2*15 + 18 = 48 against 32 -> 0.6 / 0.4
    maps[3:, 1] = np.nan  # the negative prompt never ran in the early window (NGMS)
    ex = explanation(tags, maps)
    measures = tag_measures(ex)
    got = {(m.tag, m.window): m.mass_share for m in measures}
    assert got[("positive:red", "all")] == pytest.approx(0.25)
    assert got[("positive:ball", "all")] == pytest.approx(0.75)
    assert got[("positive#1:cat", "all")] == pytest.approx(1.0)
    assert got[("negative:lowres", "late")] == pytest.approx(0.6)
    assert got[("negative:blurry", "late")] == pytest.approx(0.4)
    # A window where the branch never ran has no measures for its tags.
    assert ("negative:lowres", "early") not in got and ("positive:red", "early") in got
    for window in WINDOWS:
        for group in (("positive", 0), ("positive", 1), ("negative", 0)):
            shares = [m.mass_share for m in measures if (m.branch, m.part) == group and m.window == window]
            if shares:
                assert sum(shares) == pytest.approx(1.0)
    blurry = next(m for m in measures if m.tag == "negative:blurry")
    assert (blurry.label, blurry.weight, blurry.branch, blurry.part) == ("blurry", 1.2, "negative", 0)
    assert [m.window for m in tag_measures(ex, ("late",))] == ["late"] * 5


def test_peak_is_the_maximum_cells_centre() -> None:
    heat = np.zeros((4, 8))
    heat[2, 5] = 1.0
    assert peak(heat) == (2.5 / 4, 5.5 / 8)
    heat[0, 0] = np.nan  # NaN cells are not maxima
    assert peak(heat) == (2.5 / 4, 5.5 / 8)
    maps = np.zeros((1, 4, 4, 8))
    maps[0, :, 2, 5] = 1.0
    m = tag_measures(explanation([tag("positive", "red")], maps), ("all",))[0]
    assert (m.peak_y, m.peak_x) == (2.5 / 4, 5.5 / 8)


def test_spread_is_normalised_entropy() -> None:
    assert spread(np.ones((4, 4))) == pytest.approx(1.0)
    one = np.zeros((4, 4))
    one[1, 1] = 5.0
    assert spread(one) == 0.0
    two = np.zeros((4, 4))
    two[0, 0] = two[3, 3] = 1.0
    assert spread(two) == pytest.approx(math.log(2) / math.log(16))
    # p = (1/4, 3/4) over 4 cells.
    uneven = np.array([[1.0, 3.0], [0.0, 0.0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert spread(uneven) == pytest.approx(h / math.log(4))
    assert spread(np.zeros((3, 3))) == 0.0


def test_guidance_differences_average_the_calls_that_ran_both_branches() -> None:
    calls = (
        CallInfo("first", 0, 14.6, True, 0.9),
        CallInfo("first", 1, 5.0, False, None),  # NGMS: no uncond, no difference
        CallInfo("first", 2, 1.0, True, 0.3),
    )
    ex = explanation([tag("positive", "red")], np.ones((1, 4, 2, 2)), calls)
    got = guidance_differences(ex)
    assert got["all"] == pytest.approx(0.6)
    assert got["early"] == pytest.approx(0.9)
    assert math.isnan(got["middle"])
    assert got["late"] == pytest.approx(0.3)

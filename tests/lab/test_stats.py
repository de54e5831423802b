"""Wilson intervals against published values; the slope CI against a hand computation."""

import math

import pytest

from voidprompt.errors import VoidpromptError
from voidprompt.lab.stats import linear_slope, proportion_table, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        # Newcombe (1998), Statist. Med. 17:857-872, Table I, method 3 (Wilson score, no correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_newcombe(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_by_hand() -> None:
    # 8 of 20 (the study brief's 512x512 "Legit human"), z = 1.959964:
    # z^2/n = 0.1920729; centre = (0.4 + 0.0960365) / 1.1920729 = 0.4161125
    # half = 1.959964 / 1.1920729 * sqrt(0.012 + 0.0024009) = 0.1973060
    lo, hi = wilson_interval(8, 20)
    assert lo == pytest.approx(0.2188065, abs=2e-7)
    assert hi == pytest.approx(0.6134185, abs=2e-7)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(VoidpromptError):
        wilson_interval(3, 2)


def test_proportion_table() -> None:
    rows = proportion_table({"512x512": {"Pattern": 4, "Legit human": 16}}, outcomes=["Pattern", "Malformed"])
    assert [(r.outcome, r.count, r.total, r.proportion) for r in rows] == [
        ("Pattern", 4, 20, 0.2),
        ("Malformed", 0, 20, 0.0),
    ]
    assert rows[1].low == 0.0 and rows[1].high == pytest.approx(0.1611, abs=5e-5)


def test_slope_by_hand() -> None:
    # x = 0..3, y = 1, 3, 2, 5: Sxx = 5, Sxy = 5.5 -> slope 1.1, intercept 1.1;
    # residuals -0.1, 0.8, -1.3, 0.6 -> SSE 2.7; se = sqrt(2.7 / 2 / 5) = 0.519615;
    # t(0.975, 2) = 4.302653 -> half width 2.235724
    fit = linear_slope([0, 1, 2, 3], [1, 3, 2, 5])
    assert fit.slope == pytest.approx(1.1)
    assert fit.intercept == pytest.approx(1.1)
    assert fit.stderr == pytest.approx(math.sqrt(0.27))
    assert fit.low == pytest.approx(1.1 - 2.235724, abs=1e-6)
    assert fit.high == pytest.approx(1.1 + 2.235724, abs=1e-6)
    with pytest.raises(VoidpromptError, match="all x values are equal"):
        linear_slope([1, 1, 1], [1, 2, 3])

"""A1111 X/Y/Z value syntax, seeds, sizes, Prompt S/R, prompt matrix, prompts files."""

from pathlib import Path

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab import axes as ax


def test_csv_rules() -> None:
    assert ax.split_csv('a,"b, c", d') == ["a", "b, c", "d"]
    # A1111 quirk (csv defaults): a quote after a space is an ordinary character.
    assert ax.split_csv('a, "b, c"') == ["a", '"b', 'c"']


def test_int_ranges() -> None:
    assert ax.parse_int_values("1-5") == [1, 2, 3, 4, 5]
    assert ax.parse_int_values("1-10 (+2)") == [1, 3, 5, 7, 9]
    # A1111 quirk: end+1 even when counting down, so 1 itself is not reached.
    assert ax.parse_int_values("10-1 (-3)") == [10, 7, 4]
    assert ax.parse_int_values("10-1") == []
    # linspace(1, 10, 5) = 1, 3.25, 5.5, 7.75, 10, truncated by int()
    assert ax.parse_int_values("1-10 [5]") == [1, 3, 5, 7, 10]
    assert ax.parse_int_values("7, -3, 2 - 4") == [7, -3, 2, 3, 4]
    assert ax.parse_int_values([3, 4.0]) == [3, 4]


def test_float_ranges() -> None:
    assert ax.parse_float_values("0.5-1.5 [5]") == [0.5, 0.75, 1.0, 1.25, 1.5]
    values = ax.parse_float_values("0.1-1.0 (+0.2)")
    # A1111 quirk: np.arange(0.1, 1.2, 0.2) overshoots to 1.1 and carries binary noise.
    assert len(values) == 6
    assert values[1] == 0.1 + 0.2 == 0.30000000000000004
    assert values == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9, 1.1])
    assert ax.parse_float_values("7, 7.5") == [7.0, 7.5]


@pytest.mark.parametrize("bad", ["abc", "1-2-3", "0.1-1.0 (0.2)"])
def test_bad_numbers(bad: str) -> None:
    with pytest.raises(StudyError, match="not a number"):
        ax.parse_float_values(bad)


def test_zero_step() -> None:
    with pytest.raises(StudyError, match="step of 0"):
        ax.parse_int_values("1-5 (+0)")


def test_seeds() -> None:
    assert ax.parse_seed_values("1, 5-7", master_seed=0) == [1, 5, 6, 7]
    drawn = ax.parse_seed_values("3 random", master_seed=42)
    assert len(drawn) == 3 and all(0 <= s < 4294967294 for s in drawn)
    assert ax.parse_seed_values("3 random", master_seed=42) == drawn
    assert ax.parse_seed_values("3 random", master_seed=43) != drawn
    mixed = ax.parse_seed_values("-1, 9", master_seed=42)
    assert mixed[1] == 9 and mixed[0] != -1


def test_sizes() -> None:
    sizes = ax.parse_size_values("512x768, 4:3 @ 1.5, 16:9")
    assert [(s.width, s.height) for s in sizes] == [(512, 768), (704, 512), (640, 384)]
    assert sizes[1].spec == "4:3 @ 1.5" and sizes[1].label == "704x512"
    assert len(ax.parse_size_values("nai buckets")) == 19
    assert [(s.width, s.height) for s in ax.parse_size_values("4:3", base=64, unit=8)] == [(72, 48)]
    with pytest.raises(StudyError, match="not a size"):
        ax.parse_size_values("big")


def test_prompt_sr() -> None:
    assert ax.apply_prompt_sr("a cat, cat", "no cat", "cat", "dog") == ("a dog, dog", "no dog")
    with pytest.raises(StudyError, match="did not find 'bird'"):
        ax.apply_prompt_sr("a cat", "", "bird", "dog")


def test_prompt_matrix() -> None:
    assert ax.prompt_matrix("1girl|red hair|smile") == [
        "1girl",
        "1girl, red hair",
        "1girl, smile",
        "1girl, red hair, smile",
    ]
    assert ax.prompt_matrix("a|b,|c", put_at_start=True, delimiter=" ") == ["a", "b a", "c a", "b c a"]
    assert len(ax.prompt_matrix("a|b|c|d")) == 8
    assert ax.prompt_matrix("solo") == ["solo"]


def test_prompts_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("car\n\n  house \npark\n", encoding="utf-8")
    assert ax.read_prompts_file(path) == ["car", "house", "park"]
    with pytest.raises(StudyError, match="cannot read"):
        ax.read_prompts_file(tmp_path / "missing.txt")

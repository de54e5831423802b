"""Hostile and broken study files: bounded job counts and sizes, finite numbers, clear errors."""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab import axes as ax
from voidprompt.lab.schema import job_count
from voidprompt.lab.study import parse_study


def _peak_bytes(call: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _refused(text: str, pattern: str) -> int:
    """Parse and expand ``text``, expecting a StudyError; returns the peak of traced memory."""

    def run() -> None:
        with pytest.raises(StudyError, match=pattern):
            parse_study(text, "s.toml").expand()

    return _peak_bytes(run)


def _reference_draws(master_seed: int, purpose: str, count: int) -> list[int]:
    # Written out independently of axes.derived_rng: sha256("<master>/<purpose>"), first 8 bytes.
    digest = hashlib.sha256(f"{master_seed}/{purpose}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return [rng.randrange(4294967294) for _ in range(count)]


# ------------------------------------------------------------------------------------- job limit


@pytest.mark.parametrize(
    ("axis", "count"),
    [
        ('seed = "10000000 random"', 10_000_000),  # the probe: 55 s and 1.8 GB, then duplicate seeds
        ('steps = "1-1000000000"', 1_000_000_000),
        ('steps = "1-10 [1000000000]"', 1_000_000_000),
        ('cfg_scale = "1-2 (+0.0000001)"', 10_000_001),  # len(np.arange(1, 2 + 1e-7, 1e-7))
        ('cfg_scale = "1-2 [100000000]"', 100_000_000),
        ('seed = "60000 random, 50000 random"', 110_000),
        ('seed = "1-99999, 5-10"', 100_005),
    ],
)
def test_an_axis_over_the_job_limit_is_refused_before_its_values_are_made(axis: str, count: int) -> None:
    peak = _refused(
        f"[axes]\n{axis}\n", rf"makes {count} values, over the limit of 100000 jobs per study file"
    )
    # At most the values of one item within the limit are made (a 100,000-value list) before the
    # refusal; 10^7 random seeds took 1.8 GB before.
    assert peak < 32_000_000


def test_a_product_over_the_job_limit_is_refused_before_expansion() -> None:
    text = '[axes]\nseed = "1000 random"\nsteps = "1-101"\n'
    peak = _refused(
        text,
        r"s\.toml: \[axes\]: the study expands to 101000 jobs, over the limit of 100000 per study file; "
        r"split it into several study files, e.g\. one per part of its largest axis, seed \(1000 values\)",
    )
    assert peak < 8_000_000


def test_the_job_limit_counts_points_crossed_with_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ax, "MAX_JOBS", 12)
    text = '[axes]\nseed = "1, 2"\n[[points]]\nsteps = "1-4"\n[[points]]\nsteps = 9\ncfg_scale = "5, 6"\n'
    study = parse_study(text, "s.toml")
    assert job_count(study.axes, study.points) == 2 * (4 + 2) == len(study.expand())
    with pytest.raises(StudyError, match="expands to 14 jobs, over the limit of 12"):
        parse_study(text.replace("1-4", "1-5"), "s.toml")


def test_a_prompt_matrix_over_the_job_limit_is_refused() -> None:
    assert len(ax.prompt_matrix("a" + "|x" * 16)) == 65536
    with pytest.raises(StudyError, match=r"17 optional parts make 2\^17 prompts, over the limit of 100000"):
        ax.prompt_matrix("a" + "|x" * 17)
    with pytest.raises(StudyError, match=r"40 optional parts"):
        ax.prompt_matrix("a" + "|x" * 40)


def test_a_prompts_file_over_the_job_limit_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a\n" * 100_001, encoding="utf-8")
    with pytest.raises(StudyError, match="makes 100001 values, over the limit of 100000"):
        ax.read_prompts_file(tmp_path / "p.txt")


# --------------------------------------------------------------------------------- random seeds


def test_random_seeds_are_the_ones_drawn_before_when_they_did_not_repeat() -> None:
    # Pinned from the expansion before draws became unique: nothing repeated here, nothing moves.
    seeds = ax.parse_seed_values("5 random, -1, , 9, 2 random", 42, "axis seed")
    assert seeds == [
        1303274415, 4166449044, 4161476025, 2577034771, 369977478, 972980040, 883215744, 9,
        3341249252, 3959665316,
    ]  # fmt: skip
    reference = _reference_draws(42, "axis seed", 9)
    assert seeds == [*reference[:7], 9, *reference[7:]]


def test_random_seeds_never_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ax, "SEED_SPAN", 10)
    seeds = ax.parse_seed_values("3, 9 random", 5, "axis seed")
    assert sorted(seeds) == list(range(10))  # every seed once: the explicit 3 and 9 unused ones
    # The same draws as plain randrange calls with each repeat skipped, in order.
    digest = hashlib.sha256(b"5/axis seed").digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    expected = [3]
    while len(expected) < 10:
        seed = rng.randrange(10)
        if seed not in expected:
            expected.append(seed)
    assert seeds == expected
    assert ax.parse_seed_values("3, 9 random", 5, "axis seed") == seeds  # deterministic
    with pytest.raises(StudyError, match="no unused seed is left among the 10 random seeds"):
        ax.parse_seed_values("11 random", 5, "axis seed")


def test_a_study_of_many_random_seeds_expands_without_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 draws from 1000 seeds repeat almost surely; before, the study failed on duplicate jobs.
    monkeypatch.setattr(ax, "SEED_SPAN", 1000)
    digest = hashlib.sha256(b"3/axis seed").digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    assert len({rng.randrange(1000) for _ in range(300)}) < 300  # plain draws do repeat here
    jobs = parse_study('[study]\nmaster_seed = 3\n[axes]\nseed = "300 random"\n', "s.toml").expand()
    assert len({job.request.seed for job in jobs}) == 300


# --------------------------------------------------------------------------------- sizes, steps


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '[axes]\nsize = "512x512, 100000x100000"\n',
            r"\[axes\] size: '100000x100000' gives 100000x100000: a side is over the limit of 8192 pixels",
        ),
        (
            '[axes]\nsize = "4:3 @ 1000"\n',
            r"'4:3 @ 1000' gives 18688x14016: a side is over the limit of 8192",
        ),
        (
            '[axes]\nsize = { values = "nai buckets", base = 5000, unit = 8 }\n',
            r"nai buckets need base <= 4096 .* and unit >= 8",
        ),
        (
            '[axes]\nsize = { values = "nai buckets", base = 512, unit = 1 }\n',
            r"nai buckets need base <= 4096 .* and unit >= 8",
        ),
        (
            "[settings]\nwidth = 100000\nheight = 100000\n",
            r"\[settings\]: width=100000 is over the limit of 8192",
        ),
        (
            "[settings]\nsteps = 1000000000\n",
            r"\[settings\]: steps=1000000000 is over the limit of 1000 sampling",
        ),
        ('[axes]\nsteps = "999, 1001"\n', r"not a valid request: steps=1001 is over the limit of 1000"),
        (
            "[settings]\nenable_hr = true\ndenoising_strength = 0.5\n[axes]\nhr_scale = '2, 100'\n",
            r"not a valid request: the hires fix goes to 51200x51200: a side is over the limit of 8192",
        ),
        (
            "[settings]\nenable_hr = true\nwidth = 64\nheight = 1024\nhr_resize_x = 1024\n",
            r"the hires fix goes to 1024x16384: a side is over the limit of 8192",
        ),
    ],
)
def test_sizes_and_steps_beyond_the_request_limits_are_refused(text: str, pattern: str) -> None:
    peak = _refused(text, pattern)
    assert peak < 8_000_000


def test_sizes_and_steps_at_the_limits_are_accepted() -> None:
    hires = "[settings]\nenable_hr = true\nwidth = 512\nheight = 256\nhr_scale = 16\n"
    assert parse_study(hires, "s.toml").expand()[0].request.hr_scale == 16  # 8192x4096
    jobs = parse_study('[settings]\nsteps = 1000\n[axes]\nsize = "8192x8, 8x8192"\n', "s.toml").expand()
    assert [(j.request.width, j.request.height, j.request.steps) for j in jobs] == [
        (8192, 8, 1000),
        (8, 8192, 1000),
    ]


# ------------------------------------------------------------------------------ finite numbers


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[settings]\ncfg_scale = nan\n", r"\[settings\] cfg_scale: nan is not a finite number"),
        (
            "[settings]\ndenoising_strength = inf\n",
            r"\[settings\] denoising_strength: inf is not a finite number",
        ),
        ('[axes]\ncfg_scale = "7, nan"\n', r"\[axes\] cfg_scale: 'nan' is not a finite number"),
        ("[axes]\ncfg_scale = [7.0, -inf]\n", r"\[axes\] cfg_scale: -inf is not a finite number"),
        ('[axes]\ns_noise = "inf"\n', r"\[axes\] s_noise: 'inf' is not a finite number"),
        (
            '[axes]\ncfg_scale = "1-1' + "0" * 400 + ' [3]"\n',
            r"\[axes\] cfg_scale: .* is not a finite number",
        ),
        (
            '[prompt]\npositive = "(a:{W})"\n[axes]\nW = "1.0, nan"\n',
            r"\[axes\] W: 'nan' is not a finite number",
        ),
        (
            '[prompt]\npositive = "{W}"\n[variables]\nW = inf\n',
            r"\[variables\] W: inf is not a finite number",
        ),
        ("[cfg_by_area]\npoints = [[1.0, nan], [2.0, 9]]\n", r"\[cfg_by_area\] points: \[1\.0, nan\] is not"),
        (
            '[prompt]\nnegative_step = { tags = "lowres", weight = nan }\n',
            r"\[prompt\] negative_step: weight=nan is not a number",
        ),
    ],
)
def test_non_finite_numbers_are_study_errors(text: str, pattern: str) -> None:
    _refused(text, pattern)


# -------------------------------------------------------------------- numbers where a prompt reads one


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            '[prompt]\nnegative_step = { tags = "lowres", weight = "{W}" }\n[axes]\nW = "0.9, heavy"\n',
            r"s\.toml: \[axes\] W: 'heavy' is not a number, but \{W\} stands where the prompt reads one "
            r"\(in '\(lowres:\{W\}\)'\); write numbers",
        ),
        (
            '[prompt]\npositive = "a, (b:{W})"\n[variables]\nW = "heavy"\n',
            r"\[variables\] W: 'heavy' is not a number",
        ),
        ('[prompt]\npositive = "[a:b:{S}]"\n[axes]\nS = "half"\n', r"\[axes\] S: 'half' is not a number"),
        # A prompt axis's values are prompts too.
        ('[axes]\nprompt = "x, (a:{W}), b"\n[variables]\nW = "heavy"\n', r"\[variables\] W: 'heavy' is not"),
        ('[prompt]\npositive = "<lora:x:1:{U}>"\n[axes]\nU = "strong"\n', r"\[axes\] U: 'strong' is not"),
        (
            '[prompt]\npositive = "<lora:x:{M}>"\n[axes]\nM = "strong"\n',
            r"\[axes\] M: 'strong' is not a number",
        ),
        (
            '[prompt]\npositive = "(a:{W})"\n[[points]]\nW = "heavy"\n',
            r"\[\[points\]\] #1 W: 'heavy' is not a number",
        ),
        (
            '[prompt]\nnegative_step = { tags = "lowres", weight = "heavy" }\n',
            r"\[prompt\] negative_step: weight='heavy' is not a number; write a number or a \{variable\}",
        ),
    ],
)
def test_a_word_where_the_prompt_reads_a_number_is_a_study_error(text: str, pattern: str) -> None:
    _refused(text, pattern)


def test_words_elsewhere_and_numbers_in_weights_are_fine() -> None:
    text = (
        '[prompt]\npositive = "{ANIMAL}, (tag:{W})"\nnegative_step = { tags = "lowres", weight = "{W}" }\n'
        '[variables]\nANIMAL = "cat"\n[axes]\nW = "0.9, 1.1"\n'
    )
    jobs = parse_study(text, "s.toml").expand()
    assert [(j.request.prompt, j.request.negative_prompt) for j in jobs] == [
        ("cat, (tag:0.9)", "(lowres:0.9)"),
        ("cat, (tag:1.1)", "(lowres:1.1)"),
    ]
    fixed = parse_study('[prompt]\npositive = "(a:{W})"\n[variables]\nW = "1.2"\n', "s.toml").expand()
    assert fixed[0].request.prompt == "(a:1.2)"
    # A network's name is a word; its multipliers after the name are numbers.
    text = (
        '[prompt]\npositive = "<lora:{L}:{M}>, [{A}:{B}:0.5]"\n'
        '[variables]\nL = "x"\nM = 0.5\nA = "cat"\nB = "dog"\n'
    )
    assert parse_study(text, "s.toml").expand()[0].request.prompt == "<lora:x:0.5>, [cat:dog:0.5]"


# ------------------------------------------------------------------------------- empty files


@pytest.mark.parametrize("text", ["", "\n\n", "# a comment only\n"])
def test_an_empty_study_file_is_an_error(text: str) -> None:
    with pytest.raises(
        StudyError, match=r"^s\.toml: the study file is empty; write at least a \[prompt\] table"
    ):
        parse_study(text, "s.toml")


def test_a_study_without_a_study_table_is_named_after_its_file(tmp_path: Path) -> None:
    study = parse_study('[prompt]\npositive = "a cat"\n', tmp_path / "cats.toml")
    assert study.name == "cats"
    assert [job.request.prompt for job in study.expand()] == ["a cat"]

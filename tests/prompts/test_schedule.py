"""Prompt-editing schedules; every expected value derived by hand from A1111's schedule grammar and
``get_learned_conditioning_prompt_schedules``."""

from __future__ import annotations

import pytest

from voidprompt.errors import InvalidRequestError
from voidprompt.prompts.schedule import prompt_schedules, schedule_steps_for_sampler


def alternating(steps: int, options: list[str], template: str = "{}") -> list[tuple[int, str]]:
    # Independent statement of the rule: at boundary t, option (t - 1) mod n.
    return [(t, template.format(options[(t - 1) % len(options)])) for t in range(1, steps + 1)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:3]", [(3, "a "), (10, "a b")]),
        ("a [b: 3]", [(3, "a "), (10, "a b")]),
        ("a [b:3 ]", [(3, "a "), (10, "a b")]),
        ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
        ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
        ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
        ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
        ("a [remove::4] b", [(4, "a remove b"), (10, "a  b")]),
        ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
        ("(a [b:c:3]:1.2)", [(3, "(a b:1.2)"), (10, "(a c:1.2)")]),
        # Integers are steps, anything with "." a fraction of steps.
        ("[x:1]", [(1, ""), (10, "x")]),
        ("[x:1.0]", [(10, "")]),
        # "[x:1.2]" is a schedule: 12 steps, capped at 10, so x never appears.
        ("[x:1.2]", [(10, "")]),
        ("[a:b:0]", [(10, "b")]),
        ("[a:b:-3]", [(10, "b")]),
        ("[a:b:25]", [(10, "a")]),
        # Exponents: no "." so "1e1" counts as the integer step 10, "5e-1" as step int(0.5) = 0.
        ("[a:1e1]", [(10, "")]),
        ("[a:5e-1]", [(10, "a")]),
        # Stray brackets and colons are text at the top level.
        ("a [unbalanced", [(10, "a [unbalanced")]),
        ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
        ("[[a:1]", [(1, "["), (10, "[a")]),
        # Inside a construct everything must be a construct: the whole thing stays text.
        ("[a:[b:c]:1]", [(10, "[a:[b:c]:1]")]),
        # Escaped brackets are plain text, kept verbatim for the emphasis parser.
        ("\\[a:3\\]", [(10, "\\[a:3\\]")]),
        # Not in the language: the prompt is used verbatim.
        ("x | y", [(10, "x | y")]),
        ("[a|b", [(10, "[a|b")]),
        ("a\\", [(10, "a\\")]),
    ],
)
def test_schedules(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedules(prompt, 10) == expected


def test_alternation() -> None:
    assert prompt_schedules("[fe|]male", 10) == alternating(10, ["fe", ""], "{}male")
    assert prompt_schedules("[fe|||]male", 10) == alternating(10, ["fe", "", "", ""], "{}male")
    assert prompt_schedules("[a|(b:1.1)]", 10) == alternating(10, ["a", "(b:1.1)"])
    assert prompt_schedules("[|x]", 4) == [(1, ""), (2, "x"), (3, ""), (4, "x")]


def test_schedule_nested_in_alternation() -> None:
    # Odd steps pick "a"; even steps pick [b:c:2], which is b at step 2 and c after.
    assert prompt_schedules("[a|[b:c:2]]", 6) == [
        (1, "a"),
        (2, "b"),
        (3, "a"),
        (4, "c"),
        (5, "a"),
        (6, "c"),
    ]


def test_mixed_editing_example() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    base = "fantasy landscape with a {} and {}{}{} {}"
    assert prompt_schedules(prompt, 100) == [
        (25, base.format("mountain", "an oak", " in foreground", "", "shoddy")),
        (50, base.format("lake", "an oak", " in foreground", " in background", "shoddy")),
        (60, base.format("lake", "an oak", " in foreground", " in background", "masterful")),
        (75, base.format("lake", "an oak", "", " in background", "masterful")),
        (100, base.format("lake", "a christmas tree", "", " in background", "masterful")),
    ]


def test_hires_offsets() -> None:
    # Hires pass: fractions are offset by 1.0, integers by the base steps.
    assert prompt_schedules("a [b:.5] c", 10, 10) == [(10, "a b c")]
    assert prompt_schedules("a [b:1.5] c", 10, 10) == [(5, "a  c"), (10, "a b c")]
    assert prompt_schedules("a [b:15] c", 10, 20) == [(5, "a  c"), (20, "a b c")]
    assert prompt_schedules("a [b:1.25] c", 10, 8) == [(2, "a  c"), (8, "a b c")]


def test_old_timelines() -> None:
    # Old rule: v < 1 is a fraction, anything else a step, whatever its spelling.
    assert prompt_schedules("[x:1.0]", 10, use_old_scheduling=True) == [(1, ""), (10, "x")]
    assert prompt_schedules("[x:0.5]", 10, use_old_scheduling=True) == [(5, ""), (10, "x")]
    assert prompt_schedules("[x:5e-1]", 10, use_old_scheduling=True) == [(5, ""), (10, "x")]
    # With hires the old rule ignores the hires steps and counts on the base steps.
    assert prompt_schedules("a [b:.5] c", 10, 30, use_old_scheduling=True) == [(5, "a  c"), (10, "a b c")]


def test_second_order_steps() -> None:
    assert schedule_steps_for_sampler(10, second_order=True) == 20
    assert schedule_steps_for_sampler(10, second_order=False) == 10
    assert prompt_schedules("[a:b:0.5]", schedule_steps_for_sampler(10, True)) == [(10, "a"), (20, "b")]


def test_bad_steps() -> None:
    with pytest.raises(InvalidRequestError):
        prompt_schedules("a", 0)


# Prompt editing next to a stray ":", ")" or "]": A1111's lark grammar is ambiguous there and its
# answer depends on the process's string hash seed. voidprompt always takes the scheduled reading:
# the construct is scheduled and the stray character stays as text.
STRAY_CASES = [
    ("x [a:2]:", [(2, "x :"), (10, "x a:")]),
    ("x [a:2])", [(2, "x )"), (10, "x a)")]),
    ("x [a:2]]", [(2, "x ]"), (10, "x a]")]),
    ("[a:b:3]:c", [(3, "a:c"), (10, "b:c")]),
    ("a [b:c:5]] d", [(5, "a b] d"), (10, "a c] d")]),
    ("(x [a:b:2]:1.2)", [(2, "(x a:1.2)"), (10, "(x b:1.2)")]),
]


@pytest.mark.parametrize(("prompt", "expected"), STRAY_CASES)
def test_stray_character_next_to_prompt_editing_takes_the_scheduled_reading(
    prompt: str, expected: list[tuple[int, str]]
) -> None:
    assert prompt_schedules(prompt, 10) == expected


def test_stray_character_reading_never_varies_with_the_hash_seed() -> None:
    # One process per PYTHONHASHSEED (set/dict order of strings is all that could vary). The module
    # is loaded on its own, without the package's torch-importing __init__, to keep this quick.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import voidprompt.prompts.schedule as schedule_module

    script = (
        "import importlib.util, json, sys\n"
        "spec = importlib.util.spec_from_file_location('schedule_alone', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['schedule_alone'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(json.dumps([module.prompt_schedules(p, 10) for p in json.loads(sys.argv[2])]))\n"
    )
    prompts = [prompt for prompt, _ in STRAY_CASES]
    expected = [[list(entry) for entry in schedule] for _, schedule in STRAY_CASES]
    path = str(Path(schedule_module.__file__))
    for seed in ("0", "1", "2", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, path, json.dumps(prompts)],
            env=env, capture_output=True, text=True, check=True, timeout=60,
        )
        assert json.loads(out.stdout) == expected, f"PYTHONHASHSEED={seed}"

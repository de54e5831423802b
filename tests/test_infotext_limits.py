"""Hostile infotexts: bounded before they are parsed, and parsed in linear time within the bound."""

from __future__ import annotations

import random
import time
import tracemalloc

import pytest

from voidprompt.errors import InfotextError
from voidprompt.infotext import parse as infotext_parse
from voidprompt.infotext import parse_generation_parameters, request_fields_from_infotext
from voidprompt.infotext.parse import MAX_INFOTEXT_CHARS
from voidprompt.request import MAX_PROMPT_CHARS


def _finditer_pairs(line: str) -> list[tuple[str, str]]:
    # The straightforward reading the linear scanner must reproduce.
    return [(m.group("key"), m.group("value")) for m in infotext_parse._PAIR.finditer(line)]


def test_a_4_mb_infotext_is_refused_before_parsing() -> None:
    text = "a " * 2_000_000  # the probe: 130 s and 4.4 GB before
    tracemalloc.start()
    try:
        with pytest.raises(
            InfotextError, match=r"^the infotext is 4000000 characters, over the limit of 80000"
        ):
            request_fields_from_infotext(text)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_an_infotext_whose_prompts_are_over_the_prompt_limit_is_refused() -> None:
    prompt = "a, " * (MAX_PROMPT_CHARS // 3) + "b"  # 19,999 characters
    text = f"{prompt}\nNegative prompt: xy\nSteps: 20, Sampler: Euler, Seed: 1, Size: 512x512"
    with pytest.raises(
        InfotextError, match=r"^the infotext's prompt and negative_prompt are 20001 characters together"
    ):
        parse_generation_parameters(text)
    # One character fewer is read.
    assert parse_generation_parameters(text.replace("xy", "x"))["Negative prompt"] == "x"


def test_an_infotext_at_the_limit_is_read() -> None:
    params = ", ".join(f"Key {i}: {i}" for i in range(4000))
    text = "a cat\nSteps: 20, Seed: 1, Size: 512x512, " + params
    text += "," * (MAX_INFOTEXT_CHARS - len(text))
    assert len(text) == MAX_INFOTEXT_CHARS
    res = parse_generation_parameters(text)
    assert (res["Prompt"], res["Steps"], res["Key 3999"]) == ("a cat", "20", "3999")


@pytest.mark.parametrize(
    "line",
    [
        "a" * MAX_INFOTEXT_CHARS,  # one run of key characters without a colon: quadratic before
        "a " * (MAX_INFOTEXT_CHARS // 2),
        "x:" * (MAX_INFOTEXT_CHARS // 2),
        "ab: " + '"\\' * (MAX_INFOTEXT_CHARS // 2 - 2),
    ],
)
def test_a_long_line_is_scanned_in_linear_time(line: str) -> None:
    # A complexity guard, not a benchmark: these take well under 0.1 s; the finditer scan of the
    # first took about 25 s.
    started = time.process_time()
    pairs = infotext_parse._pairs(line)
    assert time.process_time() - started < 5
    if line.startswith("x:"):
        assert pairs == []  # one-character keys are no keys
    elif line.startswith("ab: "):
        assert [key for key, _ in pairs] == ["ab"]


def test_the_linear_scan_finds_exactly_what_finditer_finds() -> None:
    alphabet = [
        "a",
        "b",
        "_",
        "1",
        ".",
        "x",
        " ",
        "\t",
        "\u3000",
        ":",
        ",",
        '"',
        "\\",
        "-",
        "/",
        "(",
        "é",
        "\r",
    ]
    rng = random.Random(1234)
    checked = 0
    for _ in range(20_000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        assert infotext_parse._pairs(line) == _finditer_pairs(line), repr(line)
        checked += bool(_finditer_pairs(line))
    assert checked > 1000  # the sample holds plenty of lines with pairs, not just empty answers
    real = 'Steps: 20, Sampler: DPM++ 2M, Lora hashes: "a: 1234, b: 5678", Size: 512x768, Hires upscale: 2'
    assert infotext_parse._pairs(real) == _finditer_pairs(real)
    assert [key for key, _ in infotext_parse._pairs(real)] == [
        "Steps", "Sampler", "Lora hashes", "Size", "Hires upscale"
    ]  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_non_finite_number_in_an_infotext_names_its_key(value: str) -> None:
    text = f"a cat\nSteps: 20, Sampler: Euler, CFG scale: {value}, Seed: 1, Size: 512x512"
    with pytest.raises(InfotextError, match=rf"^CFG scale: '{value}' is not a finite number"):
        request_fields_from_infotext(text)

from __future__ import annotations

import pytest

from voidprompt.errors import PromptError
from voidprompt.prompts.nai import (
    NOVELAI_NEGATIVE,
    format_weight,
    nai_to_a1111,
    parse_nai_attention,
    weight_tags,
)
from voidprompt.prompts.parse import parse_prompt_attention


def test_parse_nai_attention() -> None:
    assert parse_nai_attention("a {b} [c]") == [("a ", 1.0), ("b", 1.05), (" ", 1.0), ("c", 1.05**-1)]
    assert parse_nai_attention("{{d}}") == [("d", 1.05**2)]
    assert parse_nai_attention("{[x]}") == [("x", 1.0)]
    assert parse_nai_attention("(e) g}") == [("(e) g}", 1.0)]
    assert parse_nai_attention("{open") == [("open", 1.05)]
    assert parse_nai_attention("") == [("", 1.0)]


def test_format_weight() -> None:
    assert format_weight(1 / 1.05) == "0.9524"
    assert format_weight(1.05**3) == "1.1576"  # 1.157625
    assert format_weight(1.0) == "1"
    assert format_weight(0.5) == "0.5"
    with pytest.raises(PromptError):
        format_weight(float("nan"))


def test_nai_to_a1111() -> None:
    assert nai_to_a1111("a {b} [c]") == "a (b:1.05) (c:0.9524)"
    assert nai_to_a1111("{{d}}, (e)") == "(d:1.1025), \\(e\\)"
    assert nai_to_a1111("{[x]} y") == "x y"
    assert nai_to_a1111("back\\slash") == "back\\\\slash"


def test_converted_text_reads_back_with_the_rounded_weights() -> None:
    converted = nai_to_a1111("a {b} [(c)] {{d\\}}")
    assert parse_prompt_attention(converted) == [
        ("a ", 1.0),
        ("b", 1.05),
        (" ", 1.0),
        ("(c)", 0.9524),
        (" ", 1.0),
        ("d\\", 1.1025),
    ]


def test_weight_tags() -> None:
    assert weight_tags("lowres, bad anatomy", 0.9) == "(lowres:0.9), (bad anatomy:0.9)"
    assert weight_tags(" a ,, b ,", 1.0) == "(a:1), (b:1)"
    assert weight_tags("a", 1.05) == "(a:1.05)"
    assert weight_tags("a", 0.1 + 0.2) == "(a:0.30000000000000004)"
    assert weight_tags("a", 2.0) == "(a:2)"
    assert weight_tags("", 0.9) == ""


def test_study_negative() -> None:
    # The study's stepped list, W = 0.9, written out by hand from its README.
    expected = (
        "(lowres:0.9), (bad anatomy:0.9), (bad hands:0.9), (text:0.9), (error:0.9), (missing fingers:0.9), "
        "(extra digit:0.9), (fewer digits:0.9), (cropped:0.9), (worst quality:0.9), (low quality:0.9), "
        "(normal quality:0.9), (jpeg artifacts:0.9), (signature:0.9), (watermark:0.9), (username:0.9), "
        "(blurry:0.9), (artist name:0.9)"
    )
    assert weight_tags(NOVELAI_NEGATIVE, 0.9) == expected
    assert len(NOVELAI_NEGATIVE.split(", ")) == 18

"""Emphasis, comments and AND, against values derived by hand from A1111's rules (``parse_prompt_attention``,
its comment stripping and its AND split)."""

from __future__ import annotations

import pytest

from voidprompt.errors import PromptError
from voidprompt.prompts.parse import (
    is_break,
    multicond_prompt,
    parse_prompt_attention,
    split_and,
    strip_comments,
)

UP = 1.1
DOWN = 1 / 1.1


def test_plain_and_empty() -> None:
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]
    assert parse_prompt_attention("") == [("", 1.0)]


def test_round_square_and_explicit_weights() -> None:
    assert parse_prompt_attention("an (important) word") == [("an ", 1.0), ("important", UP), (" word", 1.0)]
    assert parse_prompt_attention("a [dim] b") == [("a ", 1.0), ("dim", DOWN), (" b", 1.0)]
    assert parse_prompt_attention("(x:1.5)") == [("x", 1.5)]
    assert parse_prompt_attention("(x: 0.25 )") == [("x", 0.25)]
    assert parse_prompt_attention("(x:-1)") == [("x", -1.0)]


def test_nesting_multiplies_in_closing_order() -> None:
    # "(((house:1.3))": house gets 1.3 first, then 1.1 twice - float products in that order.
    house = 1.0 * 1.3 * 1.1 * 1.1
    sky = 1.0 * 1.1 * 1.1 * 1.1 * 1.1
    got = parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert got == [
        ("a ", 1.0),
        ("house", house),
        (" ", 1.1),
        ("on", 1.0),  # 1.1 * (1/1.1) happens to be exactly 1.0
        (" a ", 1.1),
        ("hill", 1.1 * 0.5),
        (", sun, ", 1.1),
        ("sky", sky),
        (".", 1.1),
    ]
    assert repr(house) == "1.5730000000000004"
    assert repr(sky) == "1.4641000000000006"


def test_unbalanced_brackets() -> None:
    assert parse_prompt_attention("(unbalanced") == [("unbalanced", UP)]
    assert parse_prompt_attention("[unbalanced") == [("unbalanced", DOWN)]
    assert parse_prompt_attention("unbalanced)") == [("unbalanced)", 1.0)]
    assert parse_prompt_attention("unbalanced]") == [("unbalanced]", 1.0)]
    # Unclosed: round ones first (in opening order), then square ones.
    assert parse_prompt_attention("[a (b") == [("a ", DOWN), ("b", 1.0 * UP * DOWN)]


def test_weight_close_without_open_is_text_and_lone_colon() -> None:
    assert parse_prompt_attention("a:1.2) b") == [("a:1.2) b", 1.0)]
    assert parse_prompt_attention("a: b") == [("a: b", 1.0)]
    assert parse_prompt_attention("(a:b)") == [("a:b", UP)]


def test_escapes_and_lone_backslash() -> None:
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_prompt_attention(r"a \\ b") == [("a \\ b", 1.0)]
    # A backslash before an ordinary character disappears.
    assert parse_prompt_attention(r"a\b") == [("ab", 1.0)]
    assert parse_prompt_attention("(a\\)b)") == [("a)b", UP)]


def test_adjacent_equal_weights_merge() -> None:
    assert parse_prompt_attention("(unnecessary)(parens)") == [("unnecessaryparens", UP)]


def test_break() -> None:
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    # Not a word of its own: no break.
    assert parse_prompt_attention("aBREAK b") == [("aBREAK b", 1.0)]
    got = parse_prompt_attention("BREAK a")
    assert got == [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]
    assert is_break(got[1])
    # Inside brackets the -1 is multiplied, so the encoder no longer sees a break.
    inside = parse_prompt_attention("(a BREAK b)")
    assert inside == [("a", UP), ("BREAK", -1.0 * UP), ("b", UP)]
    assert not is_break(inside[1])


def test_schedule_syntax_is_not_a_weight() -> None:
    assert parse_prompt_attention("[x:1.2]") == [("x:1.2", DOWN)]


def test_unreadable_weight_raises() -> None:
    with pytest.raises(PromptError, match=r"1\.2\.3"):
        parse_prompt_attention("(a:1.2.3)")
    # Without an open "(" it is only text.
    assert parse_prompt_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a # note", "a \n"),
        ("# whole\nb", "\nb"),
        ("a\n# whole\nb", "a\nb"),
        ("a\n# one\n# two\nb", "a\n\nb"),  # the second of two comment lines leaves an empty line
        ("a #x\nb #y", "a \nb \n"),
        ("no comment", "no comment"),
        ("#", "\n"),
    ],
)
def test_strip_comments(text: str, expected: str) -> None:
    assert strip_comments(text) == expected


def test_split_and() -> None:
    assert split_and("a cat :1.2 AND a dog") == [("a cat", 1.2), (" a dog", 1.0)]
    assert split_and("x:-0.5 AND y: .5 AND z:2.") == [("x", -0.5), (" y", 0.5), (" z", 2.0)]
    assert split_and("BRANDED things") == [("BRANDED things", 1.0)]
    assert split_and("a:1.2.3") == [("a:1.2.3", 1.0)]
    assert split_and("ANDROID AND x") == [("ANDROID", 1.0), (" x", 1.0)]
    assert split_and("") == [("", 1.0)]


def test_multicond_dedup_keeps_every_weight() -> None:
    m = multicond_prompt("a AND b:2 AND b :0.5")
    assert m.texts == ("a", " b")
    assert m.parts == ((0, 1.0), (1, 2.0), (1, 0.5))
    # Leading whitespace distinguishes texts, as in A1111.
    assert multicond_prompt("a AND a").texts == ("a", " a")

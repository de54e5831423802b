"""A1111's prompt pipeline order; expected values worked through step by step in the comments."""

from __future__ import annotations

import pytest

from voidprompt.errors import PromptError
from voidprompt.prompts.extra_networks import ExtraNetworkCall
from voidprompt.prompts.prepare import prepare_prompts
from voidprompt.prompts.styles import PromptStyle, StyleDatabase


@pytest.fixture
def db() -> StyleDatabase:
    return StyleDatabase([PromptStyle("q", "best quality, {prompt}", "lowres")])


def test_full_order(db: StyleDatabase) -> None:
    got = prepare_prompts(
        "a [cat:dog:3] # note\n<lora:foo:0.7> AND b:0.5",
        "[blur:2] AND x",
        steps=5,
        styles=["q"],
        style_db=db,
    )
    # 1 styles: "best quality, a [cat:dog:3] # note\n<lora:foo:0.7> AND b:0.5"; negative gets ", lowres".
    # 2 comments: "# note\n" -> "\n".
    assert got.prompt_for_infotext == "best quality, a [cat:dog:3] \n<lora:foo:0.7> AND b:0.5"
    assert got.negative_for_infotext == "[blur:2] AND x, lowres"
    # 3 the tag leaves the positive prompt only.
    assert got.extra_networks == (ExtraNetworkCall("lora", "foo", ("0.7",), {}, ("foo", "0.7")),)
    # 4 AND: "best quality, a [cat:dog:3] \n" (trailing whitespace dropped) and " b" with weight 0.5.
    assert got.positive == (
        ([(3, "best quality, a cat"), (5, "best quality, a dog")], 1.0),
        ([(5, " b")], 0.5),
    )
    # 5 the negative is scheduled but never split on AND.
    assert got.negative == [(2, " AND x, lowres"), (5, "blur AND x, lowres")]
    assert got.positive_texts == ("best quality, a [cat:dog:3]", " b")
    assert got.schedule_steps == 5


def test_second_order_doubles_schedule_steps() -> None:
    got = prepare_prompts("[a:b:0.5]", "[c:d:3]", steps=10, second_order=True)
    assert got.positive == (([(10, "a"), (20, "b")], 1.0),)
    assert got.negative == [(3, "c"), (20, "d")]
    assert got.schedule_steps == 20


def test_hires_schedules() -> None:
    got = prepare_prompts("a [b:1.5]", "", steps=10, hires_steps=4)
    # (1.5 - 1.0) * 4 = 2 steps into the hires pass.
    assert got.positive == (([(2, "a "), (4, "a b")], 1.0),)
    assert got.negative == [(4, "")]


def test_duplicate_and_parts_share_a_text() -> None:
    got = prepare_prompts("x AND y AND y:2", "", steps=4)
    assert got.positive_texts == ("x", " y")
    assert got.positive_parts == ((0, 1.0), (1, 1.0), (1, 2.0))
    assert [w for _, w in got.positive] == [1.0, 1.0, 2.0]


def test_comments_can_be_disabled() -> None:
    got = prepare_prompts("a # b", "n # m", steps=4, comments=False)
    assert got.prompt_for_infotext == "a # b"
    assert got.negative == [(4, "n # m")]


def test_tags_in_negative_are_kept() -> None:
    got = prepare_prompts("p", "<lora:neg:1>", steps=4)
    assert got.extra_networks == ()
    assert got.negative == [(4, "<lora:neg:1>")]


def test_styles_need_a_database() -> None:
    with pytest.raises(PromptError, match="style database"):
        prepare_prompts("a", "", steps=4, styles=["q"])


def test_unknown_style(db: StyleDatabase) -> None:
    with pytest.raises(PromptError, match="unknown style 'zz'"):
        prepare_prompts("a", "", steps=4, styles=["zz"], style_db=db)

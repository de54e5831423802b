from __future__ import annotations

from pathlib import Path

import pytest

from voidprompt.errors import PromptError
from voidprompt.prompts.styles import PromptStyle, StyleDatabase, apply_styles, merge_prompts


@pytest.mark.parametrize(
    ("style", "prompt", "expected"),
    [
        ("{prompt}, masterpiece", "a cat", "a cat, masterpiece"),
        ("{prompt} and {prompt}", " x ", " x  and  x "),  # placeholder: the prompt goes in untouched
        ("{prompt}", "", ""),
        ("masterpiece", "a cat", "a cat, masterpiece"),
        ("  masterpiece ", " a cat  ", "a cat, masterpiece"),
        ("masterpiece", "", "masterpiece"),
        ("masterpiece", "   ", "masterpiece"),
        ("", "a cat ", "a cat"),
        ("", "", ""),
    ],
)
def test_merge_prompts(style: str, prompt: str, expected: str) -> None:
    assert merge_prompts(style, prompt) == expected


def test_styles_apply_in_order() -> None:
    assert apply_styles("a", ["b", "{prompt}, c", "d"]) == "a, b, c, d"
    assert apply_styles("a", ["x {prompt} y", "<{prompt}>"]) == "<x a y>"


def test_csv_database(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text(
        "\ufeffname,prompt,negative_prompt\n"
        'anime,"{prompt}, anime style",lowres\n'
        "# disabled,ignored,ignored\n"
        ",no name,x\n"
        'plain,"best quality, detailed",\n'
        "short,only prompt\n",
        encoding="utf-8",
    )
    db = StyleDatabase.from_csv(path)
    assert db.names == ["anime", "plain", "short"]
    assert db.get("short") == PromptStyle("short", "only prompt", "")
    styled = db.apply_styles_to_prompt("a girl", ["anime", "plain"])
    assert styled == "a girl, anime style, best quality, detailed"
    assert db.apply_negative_styles_to_prompt("blurry", ["anime", "plain"]) == "blurry, lowres"


def test_old_csv_format(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text("name,text\nold,vintage\n", encoding="utf-8")
    db = StyleDatabase.from_csv(path)
    assert db.get("old") == PromptStyle("old", "vintage", "")


def test_unknown_style_lists_known_names() -> None:
    db = StyleDatabase([PromptStyle("anime", "x"), PromptStyle("photo", "y")])
    with pytest.raises(PromptError, match=r"'nope'.*'anime', 'photo'"):
        db.apply_styles_to_prompt("a", ["nope"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="styles file"):
        StyleDatabase.from_csv(tmp_path / "missing.csv")

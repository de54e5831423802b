from __future__ import annotations

from pathlib import Path

import pytest

from voidprompt.errors import PromptError
from voidprompt.infotext import parse_generation_parameters, request_fields_from_params
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


def test_ignore_unknown_is_a1111s_empty_style() -> None:
    # A1111 looks an unknown name up as an empty style, and merging an empty style strips the prompt.
    db = StyleDatabase([PromptStyle("anime", "{prompt}, anime", "lowres")], ignore_unknown=True)
    assert db.apply_styles_to_prompt("  a cat ", ["None"]) == "a cat"
    assert db.apply_negative_styles_to_prompt(" blurry ", ["None"]) == "blurry"
    assert db.apply_styles_to_prompt("a cat", ["None", "anime"]) == "a cat, anime"


def test_several_csv_files_later_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("name,prompt,negative_prompt\nx,one,\ny,two,\n", encoding="utf-8")
    second.write_text("name,prompt,negative_prompt\n#y,hidden,\nx,three,neg\n", encoding="utf-8")
    db = StyleDatabase.from_csv_files([first, second])
    assert db.names == ["x", "y"]
    assert db.get("x") == PromptStyle("x", "three", "neg")
    assert db.get("y") == PromptStyle("y", "two", "")


@pytest.mark.parametrize(
    ("prompt", "negative", "expected"),
    [
        # Both styles applied in order: anime, then plain.
        ("a girl, anime style, best quality", "blurry, lowres", (["anime", "plain"], "a girl", "blurry")),
        # Only the placeholder style.
        ("a girl, anime style", "blurry, lowres", (["anime"], "a girl", "blurry")),
        # The negative prompt lacks "lowres": anime does not match, plain (no negative text) does.
        ("a girl, anime style, best quality", "blurry", (["plain"], "a girl, anime style", "blurry")),
        # Runs of spaces collapse before matching.
        ("a  girl,  best quality", "", (["plain"], "a girl", "")),
        ("nothing here", "", ([], "nothing here", "")),
    ],
)
def test_extract_styles(prompt: str, negative: str, expected: tuple[list[str], str, str]) -> None:
    db = StyleDatabase(
        [
            PromptStyle("empty", "", ""),
            PromptStyle("anime", "{prompt}, anime style", "lowres"),
            PromptStyle("plain", "best quality", ""),
        ]
    )
    assert db.extract_styles_from_prompt(prompt, negative) == expected


def test_extract_inverts_apply() -> None:
    db = StyleDatabase([PromptStyle("a", "<{prompt}>", "n1"), PromptStyle("b", "tail", "n2")])
    prompt = db.apply_styles_to_prompt("core", ["b", "a"])
    negative = db.apply_negative_styles_to_prompt("neg", ["b", "a"])
    assert (prompt, negative) == ("<core, tail>", "neg, n2, n1")
    assert db.extract_styles_from_prompt(prompt, negative) == (["b", "a"], "core", "neg")


def test_bare_placeholder_style_matches_any_prompt() -> None:
    # A1111 quirk: "{prompt}" with no negative text splits into two empty ends, which every prompt has.
    db = StyleDatabase([PromptStyle("any", "{prompt}", "")])
    assert db.extract_styles_from_prompt("whatever", "neg") == (["any"], "whatever", "neg")


def test_infotext_parse_extracts_styles() -> None:
    db = StyleDatabase([PromptStyle("anime", "{prompt}, anime style", "lowres")])
    text = "a girl, anime style\nNegative prompt: blurry, lowres\nSteps: 20, Sampler: Euler, Seed: 1"
    params = parse_generation_parameters(text, style_db=db)
    assert (params["Styles array"], params["Prompt"], params["Negative prompt"]) == (
        ["anime"],
        "a girl",
        "blurry",
    )
    assert request_fields_from_params(params)["styles"] == ("anime",)
    # "Apply if any": no key when nothing matched, and without a database nothing is extracted.
    other = parse_generation_parameters("a dog\nSteps: 20, Sampler: Euler, Seed: 1", style_db=db)
    assert "Styles array" not in other and other["Prompt"] == "a dog"
    assert "Styles array" not in parse_generation_parameters(text)
    assert parse_generation_parameters(text)["Prompt"] == "a girl, anime style"

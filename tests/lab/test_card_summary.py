"""A report carries the model card's head (title, summary, figures), not the whole card."""

from __future__ import annotations

from voidprompt.demo.miniature import miniature_model_path
from voidprompt.lab.report import card_summary


def test_summary_stops_at_the_first_section() -> None:
    head = "# Card\nWhat it is.\n\n| figure | value |\n|---|---|\n| a | 1 |"
    assert card_summary(head + "\n\n## Training\nlong story\n## More\n") == head


def test_a_card_without_sections_is_kept_whole() -> None:
    assert card_summary("# Tiny card\nA random model.\n") == "# Tiny card\nA random model."


def test_the_shipped_card_summary_holds_its_figures_and_no_section() -> None:
    card = (miniature_model_path().parent / "MODEL_CARD.md").read_text(encoding="utf-8")
    summary = card_summary(card)
    first_section = card.index("\n## ")
    assert summary == card[:first_section].rstrip()
    assert "## " not in summary and "0.835" in summary and len(summary) < len(card) / 3

"""The web UI's files work offline and read without an emoji font (checked on the files themselves)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import voidprompt.server

UI = Path(voidprompt.server.__file__).with_name("ui")
# Emoji and pictograph blocks: a button drawn from these shows a box where no emoji font is installed.
EMOJI = re.compile("[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\ufe0f]")


def test_nothing_is_fetched_from_another_host() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (UI / name).read_text(encoding="utf-8")
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[/'\"]", text, re.I), name
        assert "@import" not in text and "@font-face" not in text and "url(" not in text, name


class _Buttons(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.buttons: list[str] = []
        self._inside = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "button":
            self._inside = True
            self.buttons.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "button":
            self._inside = False

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.buttons[-1] += data


def test_buttons_have_words_not_emoji() -> None:
    parser = _Buttons()
    parser.feed((UI / "index.html").read_text(encoding="utf-8"))
    assert len(parser.buttons) > 10
    for text in parser.buttons:
        assert re.search(r"[A-Za-z]{2,}", text) and not EMOJI.search(text), repr(text)
    script = (UI / "app.js").read_text(encoding="utf-8")
    # Buttons the script makes: their labels are literal text or names, never emoji escapes.
    assert not EMOJI.search(script) and not re.search(r"\\u\{?1f[0-9a-f]{3}|\\ud83[cd]", script, re.I)

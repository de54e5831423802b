"""The two CLIP text cleanings A1111 runs: transformers' CLIPTokenizer (SD1, SDXL's CLIP ViT-L) and
open_clip's tokenizer (SDXL's ViT-bigG).

transformers 4.x's CLIPTokenizer (the one A1111 1.10 pins) cleaned each piece of text between its
special tokens with ``whitespace_clean(ftfy.fix_text(text)).lower()``; open_clip adds
``html.unescape`` twice after ftfy. transformers 5 dropped the ftfy step from its CLIPTokenizer, so
the peer below is transformers 5's tokenizer fed ftfy's output: the BPE and word split come from
transformers, the cleaning from ftfy itself, independently of voidprompt's code.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ftfy
import pytest

from voidprompt.errors import PromptError
from voidprompt.models.tokenizer import ClipTokenizer, clean_text, load_clip_tokenizer
from voidprompt.testing.hf_tokenizer import hf_clip_tokenizer

AMP, AMP_WORD, SEMI, LT, GT = 261, 6259, 282, 283, 285  # "&", "amp", ";", "<", ">"
A, B, X, Y = 320, 321, 343, 344


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return hf_clip_tokenizer(tmp_path_factory.mktemp("hf_clip"))


def hf_ids(hf: Any, text: str) -> list[int]:
    return list(hf(text, add_special_tokens=False, truncation=False)["input_ids"])


CASES = {
    # text: (transformers cleaning, open_clip cleaning)
    "a &amp; b": ("a & b", "a & b"),
    "<x> &amp; y": ("<x> &amp; y", "<x> & y"),
    "&amp;amp;": ("&", "&"),
    "a &amp b": ("a &amp b", "a & b"),
    "a&not b": ("a&not b", "a¬ b"),
    "l1 &amp;\n<l2> &amp;": ("l1 & <l2> &amp;", "l1 & <l2> &"),
    "  Foo\u3000&amp;amp; BAR  ": ("foo & bar", "foo & bar"),
}


@pytest.mark.parametrize("text", list(CASES))
def test_clean_text_dialects(text: str) -> None:
    transformers_clean, open_clip_clean = CASES[text]
    assert clean_text(text) == clean_text(text, "transformers") == transformers_clean
    assert clean_text(text, "open_clip") == open_clip_clean


def test_token_streams_differ_on_lt_and_entity() -> None:
    l_tok = load_clip_tokenizer()
    g_tok = load_clip_tokenizer("open_clip")
    assert l_tok.dialect == "transformers" and g_tok.dialect == "open_clip"
    assert l_tok.encode("a &amp; b") == g_tok.encode("a &amp; b") == [A, AMP, B]
    assert l_tok.encode("<x> &amp; y") == [LT, X, GT, AMP, AMP_WORD, SEMI, Y]
    assert g_tok.encode("<x> &amp; y") == [LT, X, GT, AMP, Y]
    assert l_tok.encode("&amp;amp;") == g_tok.encode("&amp;amp;") == [AMP]


@pytest.mark.parametrize(
    "text",
    [
        *CASES,
        "a photo of a cat",
        "(masterpiece:1.2), 1girl, <lora:x:0.5> &amp; &lt;tag&gt;",
        "ｆｕｌｌ，ｗｉｄｔｈ",
    ],
)
def test_transformers_dialect_matches_peer(hf: Any, text: str) -> None:
    assert load_clip_tokenizer().encode(text) == hf_ids(hf, ftfy.fix_text(text))
    g_expected = hf_ids(hf, html.unescape(html.unescape(ftfy.fix_text(text))))
    assert load_clip_tokenizer("open_clip").encode(text) == g_expected


def test_special_token_spellings() -> None:
    l_tok = load_clip_tokenizer()
    g_tok = load_clip_tokenizer("open_clip")
    # transformers cuts "<|endoftext|>" out before cleaning, so the piece after it holds no "<"
    # and ftfy decodes its entity; open_clip's splitter does not know that spelling at all.
    assert l_tok.encode("<|endoftext|> &amp;") == [49407, AMP]
    assert 49407 not in g_tok.encode("<|endoftext|> &amp;")
    assert g_tok.encode("<end_of_text> x") == [49407, X]
    assert 49407 not in l_tok.encode("<end_of_text> x")
    assert (g_tok.bos_id, g_tok.eos_id, g_tok.comma_id) == (l_tok.bos_id, l_tok.eos_id, l_tok.comma_id)
    assert g_tok.token_text(49407) == "<end_of_text>"


def test_with_dialect_and_bad_dialect() -> None:
    l_tok = load_clip_tokenizer()
    assert l_tok.with_dialect("transformers") is l_tok
    g = l_tok.with_dialect("open_clip")
    assert isinstance(g, ClipTokenizer) and g.encode("<x> &amp; y") == [LT, X, GT, AMP, Y]
    with pytest.raises(PromptError, match="dialect"):
        clean_text("a", "openai")  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="dialect"):
        ClipTokenizer.from_file(Path("unused"), dialect="bigG")  # type: ignore[arg-type]

"""ClipTokenizer: known ids, cleaning, and a cross-check against transformers' CLIPTokenizer."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from voidprompt.errors import PromptError
from voidprompt.models.tokenizer import (
    ClipTokenizer,
    bytes_to_unicode,
    clean_text,
    default_vocab_path,
    load_clip_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return load_clip_tokenizer()


def test_known_ids(tok: ClipTokenizer) -> None:
    # Ids published with OpenAI CLIP / every SD1 tokenizer dump.
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert (tok.bos_id, tok.eos_id) == (49406, 49407)
    assert tok.comma_id == 267
    assert tok.token_text(267) == ",</w>"
    assert len(tok.encoder) == 49408


def test_vocab_layout(tok: ClipTokenizer) -> None:
    alphabet = list(bytes_to_unicode().values())
    assert len(alphabet) == 256 == len(set(alphabet))
    # First 256 ids are bare byte symbols, the next 256 their word-final forms.
    assert [tok.decoder[i] for i in range(256)] == alphabet
    assert [tok.decoder[256 + i] for i in range(256)] == [a + "</w>" for a in alphabet]
    assert tok.decoder[49405] == "".join(next(iter(_merges_from_gz()[-1:])))


def test_full_width_comma_and_case(tok: ClipTokenizer) -> None:
    assert tok.encode("a，b") == tok.encode("a,b") == [320, 267, 321]
    assert tok.encode("A Photo OF a CAT") == tok.encode("a photo of a cat")
    assert tok.encode("  a \n\t photo   ") == tok.encode("a photo")
    assert tok.encode("") == []


def test_cleaning() -> None:
    assert clean_text("  Foo\u3000&amp;amp; BAR  ") == "foo & bar"
    # Punctuation runs are one word; a lone comma is its own word.
    tok = load_clip_tokenizer()
    assert tok.tokenize("a,,b") == ["a</w>", ",,</w>", "b</w>"]
    assert tok.tokenize("don't") == ["don</w>", "'t</w>"]


def test_decode_roundtrip(tok: ClipTokenizer) -> None:
    text = "héllo wörld 日本 1234, (masterpiece:1.2)"
    assert (
        tok.decode(tok.encode(text))
        == " ".join(
            ["héllo", "wörld", "日本", "1", "2", "3", "4", ",", "(", "masterpiece", ":", "1", ".", "2", ")"]
        )
        + " "
    )
    assert tok.decode([49406, 320, 49407]) == "<|startoftext|>a <|endoftext|>"


def test_bpe_cache_is_per_instance() -> None:
    a = ClipTokenizer.from_file(default_vocab_path())
    b = ClipTokenizer.from_file(default_vocab_path())
    a.encode("zebracorn")
    assert "zebracorn" in "".join(a._cache)
    assert not any("zebra" in k for k in b._cache)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="merges"):
        ClipTokenizer([("a", "b")])
    with pytest.raises(PromptError, match="cannot read"):
        ClipTokenizer.from_file(tmp_path / "missing.txt.gz")
    with pytest.raises(PromptError, match="outside"):
        load_clip_tokenizer().token_text(49408)


def _merges_from_gz() -> list[tuple[str, str]]:
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return [(a, b) for a, b in (line.split() for line in lines[1 : 49152 - 256 - 2 + 1])]


_WORDS = (
    "masterpiece best quality 1girl solo lowres bad anatomy hands text error missing fingers extra "
    "digit fewer digits cropped worst jpeg artifacts signature watermark username blurry don't we're "
    "it's I'll they've photorealistic 8k uhd dslr hdr ( ) [ ] : 1.2 , ,, ... !? # @user a_b x-y "
    "Zebracorn SUPERCALIFRAGILISTIC qwzx mmmmmmmm 2024 3.14159 \\( <lora:x:1>"
)


def _random_ascii_texts(n: int) -> list[str]:
    rng = random.Random(1234)
    words = _WORDS.split()
    out = []
    for _ in range(n):
        k = rng.randint(1, 25)
        seps = [" ", ", ", ",", "  ", "\t", " \n "]
        text = ""
        for _ in range(k):
            text += rng.choice(words) + rng.choice(seps)
        if rng.random() < 0.3:
            text += "".join(chr(rng.randint(33, 126)) for _ in range(rng.randint(1, 12)))
        out.append(text)
    return out


def test_cross_check_transformers(tok: ClipTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # A second implementation: transformers' CLIPTokenizer built from vocab.json / merges.txt that
    # we derive here from the same gz file, following OpenAI's layout independently of our class.
    alphabet = list(bytes_to_unicode().values())
    merges = _merges_from_gz()
    vocab_list = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab_list)}), "utf-8")
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", "utf-8"
    )
    # transformers 5 loads vocab.json / merges.txt from a local folder (no hub access: offline).
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    # Guard against a silently broken reference (e.g. every word mapped to the unknown token).
    assert ref("a photo of a cat", add_special_tokens=False)["input_ids"] == [320, 1125, 539, 320, 2368]
    texts = [*_random_ascii_texts(300), "a photo of a cat", "A PHOTO", "x" * 200]
    for text in texts:
        expected = ref(text, add_special_tokens=False, truncation=False)["input_ids"]
        assert tok.encode(text) == expected, text

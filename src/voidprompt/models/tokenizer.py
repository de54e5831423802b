"""OpenAI CLIP byte-level BPE tokenizer, read from the shipped ``bpe_simple_vocab_16e6.txt.gz``.

Written from the behaviour of OpenAI CLIP's ``simple_tokenizer`` (MIT): the same vocabulary layout
and word-split regex, so the text encoders see exactly the ids they were trained on. Two dialects
clean the text the way the two tokenizers A1111 runs do (see :func:`clean_text`): ``"transformers"``
(SD1 and SDXL's CLIP ViT-L) and ``"open_clip"`` (SDXL's OpenCLIP ViT-bigG). Nothing here touches the
network; the vocabulary file ships inside the package.
"""

from __future__ import annotations

import functools
import gzip
import html
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Final, Literal, get_args

import ftfy
import regex

from voidprompt.errors import PromptError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# open_clip names the same two ids differently, and only its names are special in its word splitter.
OPEN_CLIP_BOS_TOKEN = "<start_of_text>"
OPEN_CLIP_EOS_TOKEN = "<end_of_text>"

Dialect = Literal["transformers", "open_clip"]
DIALECTS: Final[tuple[str, ...]] = get_args(Dialect)
WORD_END = "</w>"
VOCAB_SIZE = 49408
# The gz file holds far more merges than CLIP uses; CLIP keeps the first 49152 - 256 - 2 of them
# so that 256 bytes + 256 word-final bytes + merges + 2 specials = 49408 ids.
N_MERGES = VOCAB_SIZE - 2 * 256 - 2

# OpenAI's word splitter: special tokens, English contractions, letter runs, single digits, and runs
# of anything that is neither whitespace, letter nor digit (so "," is its own word but ",," is one).
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_TRANSFORMERS_WORD_RE = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|" + _WORDS, regex.IGNORECASE)
_OPEN_CLIP_WORD_RE = regex.compile(r"<start_of_text>|<end_of_text>|" + _WORDS, regex.IGNORECASE)
# transformers' tokenizer cuts its added special tokens out (exact spelling) before cleaning the
# pieces between them one by one.
_TRANSFORMERS_SPECIALS_RE = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE_RE = re.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2 / CLIP byte-level BPE alphabet).

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted to
    code points 256 and up so that no BPE symbol is whitespace or a control character.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    # Insertion order matters: the vocabulary's first 256 ids follow it (printable bytes first).
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def check_dialect(dialect: str) -> None:
    if dialect not in DIALECTS:
        raise PromptError(
            f"unknown CLIP tokenizer dialect {dialect!r}; use one of {', '.join(map(repr, DIALECTS))}"
        )


def clean_text(text: str, dialect: Dialect = "transformers") -> str:
    """Text cleaning before the word split, as the tokenizer named by ``dialect`` does it.

    - ``"transformers"``: transformers' CLIPTokenizer (4.x, with ftfy installed), which A1111 runs for
      SD1 and for SDXL's CLIP ViT-L: ``ftfy.fix_text`` only. ftfy decodes HTML entities (repeatedly,
      and only the unambiguous ones ending in ";") unless the line, or an earlier one, holds a "<".
    - ``"open_clip"``: open_clip's (and OpenAI CLIP's) tokenizer, which A1111 runs for SDXL's ViT-bigG:
      ``ftfy.fix_text`` then ``html.unescape`` twice, so "<x> &amp; y" reads "<x> & y" here and stays
      "<x> &amp; y" above, and "a &amp b" (no ";") reads "a & b".

    Both then fold whitespace, strip and lower-case. ftfy's default config also folds full-width
    characters ("，" -> ","), which matters for prompts typed with a CJK input method.
    """
    check_dialect(dialect)
    text = ftfy.fix_text(text)
    if dialect == "open_clip":
        text = html.unescape(html.unescape(text))
    text = _WHITESPACE_RE.sub(" ", text.strip()).strip()
    return text.lower()


def _pairs(word: Sequence[str]) -> set[tuple[str, str]]:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


class ClipTokenizer:
    """CLIP BPE tokenizer. ``encode`` returns ids without BOS/EOS; ids are in [0, 49408).

    ``dialect`` picks whose text cleaning and special-token spelling it follows (see
    :func:`clean_text`); the vocabulary and ids are the same for both.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], *, dialect: Dialect = "transformers") -> None:
        check_dialect(dialect)
        if len(merges) != N_MERGES:
            raise PromptError(
                f"CLIP tokenizer needs exactly {N_MERGES} BPE merges, got {len(merges)}; "
                "use the OpenAI bpe_simple_vocab_16e6.txt.gz file"
            )
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + WORD_END for s in symbols]
        vocab.extend("".join(m) for m in merges)
        if dialect == "open_clip":
            bos, eos = OPEN_CLIP_BOS_TOKEN, OPEN_CLIP_EOS_TOKEN
        else:
            bos, eos = BOS_TOKEN, EOS_TOKEN
        vocab.extend([bos, eos])
        self.dialect: Dialect = dialect
        self._merges = tuple(merges)
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        if len(self.encoder) != VOCAB_SIZE:
            raise PromptError(
                f"CLIP vocabulary has {len(self.encoder)} distinct tokens, expected {VOCAB_SIZE}; "
                "the merges file is damaged"
            )
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        # Per-instance cache: BPE of a word never changes for one vocabulary.
        self._cache: dict[str, tuple[str, ...]] = {bos: (bos,), eos: (eos,)}
        self.bos_id = self.encoder[bos]
        self.eos_id = self.encoder[eos]
        # A1111 looks up ",</w>" in the vocabulary for comma backtracking: only a lone comma word counts.
        self.comma_id = self.encoder["," + WORD_END]
        self.vocab_size = VOCAB_SIZE

    def with_dialect(self, dialect: Dialect) -> ClipTokenizer:
        """The same vocabulary with another dialect's cleaning (``self`` when it already has it)."""
        if dialect == self.dialect:
            return self
        return ClipTokenizer(self._merges, dialect=dialect)

    @classmethod
    def from_file(cls, path: str | Path, *, dialect: Dialect = "transformers") -> ClipTokenizer:
        """Read an OpenAI-format ``bpe_simple_vocab_16e6.txt.gz`` (first line is a version header)."""
        check_dialect(dialect)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except OSError as exc:
            raise PromptError(f"cannot read CLIP BPE vocabulary {path}: {exc}") from exc
        merges: list[tuple[str, str]] = []
        for line in lines[1 : N_MERGES + 1]:
            parts = line.split()
            if len(parts) != 2:
                raise PromptError(f"bad merge line {line!r} in {path}; expected two symbols")
            merges.append((parts[0], parts[1]))
        return cls(merges, dialect=dialect)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Split one byte-encoded word into vocabulary symbols; the last symbol carries ``</w>``."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        symbols: list[str] = [*word[:-1], word[-1] + WORD_END]
        while len(symbols) > 1:
            # Merge the pair that was learned earliest (lowest rank), everywhere it occurs.
            best = min(_pairs(symbols), key=lambda p: self.bpe_ranks.get(p, len(self.bpe_ranks)))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        result = tuple(symbols)
        self._cache[word] = result
        return result

    def tokenize(self, text: str) -> list[str]:
        """Vocabulary symbols of ``text`` after cleaning (no BOS/EOS)."""
        if self.dialect == "transformers":
            pieces = [p for p in _TRANSFORMERS_SPECIALS_RE.split(text) if p]
            word_re = _TRANSFORMERS_WORD_RE
        else:
            pieces = [text]
            word_re = _OPEN_CLIP_WORD_RE
        out: list[str] = []
        for piece in pieces:
            if piece in (BOS_TOKEN, EOS_TOKEN) and self.dialect == "transformers":
                out.append(piece)
                continue
            for word in word_re.findall(clean_text(piece, self.dialect)):
                encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                out.extend(self.bpe(encoded))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS and without truncation."""
        return [self.encoder[s] for s in self.tokenize(text)]

    def token_text(self, token_id: int) -> str:
        """The vocabulary symbol for one id, e.g. ``"cat</w>"``; for reports."""
        if token_id not in self.decoder:
            raise PromptError(f"token id {token_id} is outside the CLIP vocabulary (0..{VOCAB_SIZE - 1})")
        return self.decoder[token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: word ends become spaces (so the result usually ends with a space).

        Specials decode to their literal names (they are plain ASCII symbols).
        """
        text = "".join(self.token_text(int(i)) for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(WORD_END, " ")


def default_vocab_path() -> Path:
    """Path of the shipped OpenAI CLIP BPE vocabulary."""
    return Path(str(resources.files("voidprompt.models") / "clip_vocab" / "bpe_simple_vocab_16e6.txt.gz"))


@functools.lru_cache(maxsize=2)
def load_clip_tokenizer(dialect: Dialect = "transformers") -> ClipTokenizer:
    """The CLIP tokenizer from the shipped vocabulary (built once per dialect; read-only afterwards).

    The default is the one A1111 runs for SD1 and SDXL's CLIP ViT-L; SDXL's ViT-bigG takes
    ``"open_clip"``.
    """
    return ClipTokenizer.from_file(default_vocab_path(), dialect=dialect)

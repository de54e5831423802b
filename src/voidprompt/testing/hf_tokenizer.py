"""A transformers CLIPTokenizer built from the CLIP vocabulary voidprompt ships.

Tests and benchmarks that run diffusers' own pipeline as a peer need a tokenizer, and diffusers'
usual source (a hub download) is not available. The vocab.json / merges.txt layout follows OpenAI's
CLIP: 256 byte symbols, their end-of-word forms, the merges in order, then the two special tokens.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from voidprompt.models.tokenizer import bytes_to_unicode, default_vocab_path

# OpenAI's vocabulary uses the first 49152 - 256 - 2 merges of the BPE file.
MERGE_COUNT = 49152 - 256 - 2


def write_hf_clip_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json and merges.txt for transformers' CLIPTokenizer into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8"
    )
    return out


def hf_clip_tokenizer(directory: str | Path) -> Any:
    """transformers.CLIPTokenizer for SD1 (pad = <|endoftext|>, 77 tokens), fully offline."""
    from transformers import CLIPTokenizer

    path = write_hf_clip_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(
        str(path), local_files_only=True, pad_token="<|endoftext|>", model_max_length=77
    )

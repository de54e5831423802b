"""The native size /sdapi/v1/sd-models reports (the web UI's default size), read from a file's header."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from voidprompt.demo.miniature import miniature_model_path
from voidprompt.server.checkpoints import read_checkpoint_facts


def test_miniature_records_its_own_native_size() -> None:
    """The miniature model's voidprompt.arch metadata says 128, which beats SD1's 512."""
    path = miniature_model_path()
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["voidprompt.arch"])["vae_sample_size"] == 128
    facts = read_checkpoint_facts(path)
    assert (facts.family is not None and facts.family.value, facts.native_size) == ("sd1", 128)


def test_unreadable_file_has_no_native_size(tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\xff" * 64)
    facts = read_checkpoint_facts(bad)
    assert (facts.family, facts.native_size) == (None, None)

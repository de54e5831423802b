"""Fixtures for the loader tests: tiny checkpoint files written once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from voidprompt.models.detect import ModelFamily
from voidprompt.testing.fake_checkpoints import fake_full_state_dict, tiny_sd1_modules, tiny_sd1_state_dict


class StubTokenizer:
    """Stands in for the CLIP tokenizer: loading must not depend on the prompts package in these tests."""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_modules() -> tuple[object, object, object]:
    return tiny_sd1_modules(0)


@pytest.fixture(scope="session")
def tiny_sd() -> dict[str, torch.Tensor]:
    return tiny_sd1_state_dict(0)


@pytest.fixture(scope="session")
def fake_full() -> Callable[[ModelFamily], dict[str, torch.Tensor]]:
    """fake_full_state_dict per family, built once per session (a full-size SDXL layout takes about
    half a second even on the meta device). Callers must not modify the dict."""
    made: dict[ModelFamily, dict[str, torch.Tensor]] = {}

    def get(family: ModelFamily) -> dict[str, torch.Tensor]:
        if family not in made:
            made[family] = fake_full_state_dict(family)
        return made[family]

    return get


@pytest.fixture
def stub_tokenizer() -> StubTokenizer:
    return StubTokenizer()

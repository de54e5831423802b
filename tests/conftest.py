"""Shared fixtures. Tiny models are built in memory; nothing is downloaded."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-layout .safetensors (random weights, CompVis keys), written once per session."""
    from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

    return Path(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from voidprompt.models.load import load_model
    from voidprompt.pipeline.engine import Engine

    return Engine(load_model(tiny_checkpoint))

"""Lab fixtures: one tiny random checkpoint per session (its VAE downsamples by 2, not 8)."""

from pathlib import Path

import pytest
import torch

from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # The test machines have 2 shared cores; one intra-op thread is faster than two fighting.
    torch.set_num_threads(1)

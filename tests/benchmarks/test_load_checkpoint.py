"""benchmarks/load_checkpoint.py's measuring child on the tiny SDXL file: it counts every SDXL module
(both text encoders) at the precision it loaded. The full-size run is by hand only (6.5 GiB file)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from voidprompt.testing.fake_checkpoints import tiny_sdxl_modules, write_tiny_sdxl_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_checkpoint.py"


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("load_checkpoint", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_child_counts_both_text_encoders_at_the_load_precision(
    script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    path = write_tiny_sdxl_checkpoint(tmp_path / "tiny-sdxl.safetensors")
    modules = [m for m in tiny_sdxl_modules() if m is not None]
    assert len(modules) == 4
    params = sum(p.numel() for m in modules for p in m.parameters())
    fp16 = script._run("ours", path, "fp16")
    assert fp16["params"] == params
    # Parameters at 2 bytes, plus the buffers (CLIP's int64 position ids): a few KiB at most.
    assert 2 * params <= fp16["model_mib"] * 2**20 <= 2 * params + 64 * 1024
    assert fp16["peak_above_base_mib"] > 0

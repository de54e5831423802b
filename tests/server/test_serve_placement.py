"""`voidprompt serve --device/--precision`: refused in one line before the server starts; the
RNG default follows the device; the model host loads in the policy and keeps a float32 VAE once a
half decode has overflowed (A1111's auto_vae_precision lasts the process)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from voidprompt.models.placement import PrecisionPolicy
from voidprompt.server.cli import _parser, build_config, main
from voidprompt.server.state import App


def _cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)


def _fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA A10")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(major=8))
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["--device", "cuda"], "voidprompt serve: --device 'cuda': this torch"),
        (["--precision", "fp16"], "voidprompt serve: --precision fp16 on the CPU: refused"),
    ],
)
def test_serve_refuses_in_one_line(
    argv: list[str], start: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu_only(monkeypatch)
    assert main([*argv, "--no-miniature", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith(start)
        and err[0].endswith("Available here: cpu.") == ("--device" in argv)
    )


def test_serve_passes_device_and_precision_on() -> None:
    config = build_config(_parser().parse_args(["--no-miniature", "--precision", "bf16"]))
    assert (config.device, config.precision) == ("cpu", "bf16")  # type: ignore[attr-defined]


def test_the_servers_rng_default_is_the_devices(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, server_tools: Any
) -> None:
    make_config, _ = server_tools
    cpu_app = App(make_config(tmp_path / "a", tiny_checkpoint))
    assert cpu_app.options.snapshot()["randn_source"] == "CPU"
    assert cpu_app.host.precision.name == "fp32"
    _fake_gpu(monkeypatch)
    gpu_app = App(make_config(tmp_path / "b", tiny_checkpoint, device="cuda"))
    assert gpu_app.options.snapshot()["randn_source"] == "GPU"
    assert gpu_app.host.device == torch.device("cuda", 0)
    assert gpu_app.host.precision == PrecisionPolicy(
        "fp16", torch.float16, torch.float16, torch.float16, "cuda"
    )


def test_a_float32_vae_carries_over_to_the_next_model(
    tmp_path: Path, tiny_checkpoint: Path, server_tools: Any
) -> None:
    make_config, _ = server_tools
    root = tmp_path / "srv"
    app = App(make_config(root, tiny_checkpoint))
    shutil.copy(tiny_checkpoint, root / "models" / "Stable-diffusion" / "second.safetensors")
    app.registry.refresh()
    host = app.host
    host.precision = PrecisionPolicy("fp32", torch.float32, None, torch.float16, "cpu")
    first, second = (host.registry.find(name) for name in ("tiny.safetensors", "second.safetensors"))
    engine = host.ensure_loaded(first, None)
    assert next(engine.components.vae.parameters()).dtype == torch.float16
    # What the Engine records when a half decode overflows (tests/pipeline/test_precision.py).
    engine.components.precision = engine.components.precision.with_vae(torch.float32)
    engine = host.ensure_loaded(second, None)
    assert next(engine.components.vae.parameters()).dtype == torch.float32
    assert host.precision.vae == torch.float32 and host.precision.weights == torch.float32


@pytest.mark.parametrize(
    ("argv", "run_args"),
    [
        ([], ()),
        (["--device", "cpu"], ("--device", "cpu")),
        (["--precision", "fp32", "--device", "cpu"], ("--device", "cpu", "--precision", "fp32")),
    ],
)
def test_study_runs_started_by_the_server_get_its_explicit_placement(
    argv: list[str], run_args: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voidprompt.server import studies

    config: Any = build_config(_parser().parse_args(["--no-miniature", *argv]))
    assert config.study_run_args == run_args
    registry = studies.StudyRegistry(None, run_args=config.study_run_args)
    started: list[list[str]] = []

    class FakeProcess:
        stdout = None

        def __init__(self, args: list[str], **_: Any) -> None:
            started.append(list(args))

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(studies.subprocess, "Popen", FakeProcess)
    study = tmp_path / "s.toml"
    study.write_text('[study]\nname = "s"\n')
    registry.start_run(studies.StudyEntry("s", study, None), max_jobs=3, batch_size=None)
    argv_run = started[0][started[0].index("run") :]
    # Without serve's flags the study file's [run] table decides; with them the server's choice wins.
    assert argv_run == ["run", str(study), "--no-progress", *run_args, "--max-jobs", "3"]

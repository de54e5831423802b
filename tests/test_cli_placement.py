"""`voidprompt txt2img/img2img --device/--precision`: a device or precision that cannot be had is
one line on stderr and exit code 1, before anything is loaded or written; the RNG default follows
the device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from voidprompt.cli import _request_fields, build_parser, main
from voidprompt.imagemeta import read_infotext


def _cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path) -> str:
    code = main([*argv, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert not out.exists()  # nothing written, not even the folder
    return lines[0]


def test_cuda_on_a_cpu_only_torch_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _cpu_only(monkeypatch)
    line = _refused(capsys, ["txt2img", "--device", "cuda", "--steps", "1"], tmp_path / "out")
    assert line == (
        f"voidprompt: error: --device 'cuda': this torch ({torch.__version__}) is a CPU-only build; "
        "install a CUDA build of torch. Available here: cpu."
    )


def test_a_missing_gpu_index_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA L4")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    line = _refused(capsys, ["txt2img", "--device", "cuda:3"], tmp_path / "out")
    assert "only 1 CUDA device" in line and "cuda:0 (NVIDIA L4)" in line


def test_fp16_on_the_cpu_is_refused_for_img2img_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "grey").save(init)
    line = _refused(capsys, ["img2img", "--init-image", str(init), "--precision", "fp16"], tmp_path / "out")
    assert line.startswith("voidprompt: error: --precision fp16 on the CPU: refused")


def test_the_rng_default_is_the_devices() -> None:
    args = build_parser().parse_args(["txt2img"])
    assert _request_fields(args, torch.device("cpu"))["randn_source"] == "CPU"
    assert _request_fields(args, torch.device("cuda", 0))["randn_source"] == "GPU"
    explicit = build_parser().parse_args(["txt2img", "--rng", "NV"])
    assert _request_fields(explicit, torch.device("cuda", 0))["randn_source"] == "NV"


def test_bf16_on_the_cpu_generates_and_the_infotext_keeps_cpu_noise(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["txt2img", "--model", str(tiny_checkpoint), "--steps", "1", "--width", "64", "--height", "64"]
    assert main([*argv, "--seed", "5", "--precision", "bf16", "--out", str(out)]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert len(written) == 1 and written[0].parent == out
    infotext, _ = read_infotext(written[0])
    assert infotext is not None and "RNG: CPU" in infotext and "Seed: 5," in infotext


def test_the_parser_offers_the_placement_flags() -> None:
    args = build_parser().parse_args(["txt2img"])
    assert (args.device, args.precision, args.rng, args.compile) == ("cpu", "auto", None, False)
    assert vars(build_parser().parse_args(["img2img", "--init-image", "x", "--compile"]))["compile"] is True

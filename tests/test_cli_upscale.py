"""``voidprompt upscale``: A1111's extras upscale from the command line, and ``--upscaler-dir`` on the
generation commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from voidprompt.cli import build_parser, main
from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.models.upscalers.tiled import upscale_with_model
from voidprompt.testing.tiny_upscalers import write_tiny_rrdb


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write_tiny_rrdb(tmp_path / "models" / "ESRGAN" / "4x-Tiny.pth", "old", seed=2, nf=4, gc=4)
    return tmp_path / "models"


def test_upscale_writes_a1111s_postprocessing_text(models: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a hill\nSteps: 3")
    source.save(tmp_path / "pic.png", pnginfo=info)
    out = tmp_path / "out"
    argv = ["upscale", str(tmp_path / "pic.png"), "--upscaler", "4x-Tiny", "--upscaler-dir", str(models)]
    assert main([*argv, "--scale", "2", "--tile", "8", "--tile-overlap", "2", "--out", str(out)]) == 0
    [written] = sorted(out.iterdir())
    result = Image.open(written)
    assert result.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: 4x-Tiny"
    assert result.info["parameters"] == "a hill\nSteps: 3"
    net = load_rrdbnet(models / "ESRGAN" / "4x-Tiny.pth")
    expected = upscale_with_model(net, source, tile=8, overlap=2).resize((40, 24), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(result.convert("RGB")), np.asarray(expected))


def test_upscale_refuses_an_absent_builtin_and_lists(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "p.png")
    code = main(
        ["upscale", str(tmp_path / "p.png"), "--upscaler-dir", str(models), "--out", str(tmp_path / "o")]
    )
    assert code != 0
    assert "RealESRGAN_x4plus.pth; place it in" in capsys.readouterr().err
    assert main(["upscale", "--list", "--upscaler-dir", str(models)]) == 0
    assert capsys.readouterr().out.splitlines()[:4] == [
        "None",
        "Lanczos",
        "Nearest",
        f"4x-Tiny\t{models / 'ESRGAN' / '4x-Tiny.pth'}",
    ]


def test_generation_commands_take_the_upscaler_folder() -> None:
    args = build_parser().parse_args(["txt2img", "--prompt", "x", "--upscaler-dir", "/m"])
    assert args.upscaler_dir == Path("/m")
    assert build_parser().parse_args(["txt2img"]).upscaler_dir == Path("models")

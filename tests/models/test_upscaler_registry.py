"""Upscaler names: A1111's order and fields, files found in the ESRGAN / RealESRGAN folders, and the
messages for A1111's names whose file is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.models.upscalers.tiled import upscale_with_model
from voidprompt.pipeline.images import check_upscaler, resize_image
from voidprompt.testing.tiny_upscalers import write_tiny_rrdb


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    write_tiny_rrdb(tmp_path / "ESRGAN" / "4x-Tiny.pth", "old", nf=4, gc=4)
    write_tiny_rrdb(tmp_path / "ESRGAN" / "nested" / "abc.safetensors", "old", ups=1, nf=4, gc=4)
    write_tiny_rrdb(tmp_path / "RealESRGAN" / "RealESRGAN_x4plus.pth", "basicsr", wrapper="params_ema")
    (tmp_path / "ESRGAN" / "notes.txt").write_text("not a model")
    return tmp_path


def test_names_in_a1111_order(models_dir: Path) -> None:
    ups = Upscalers.in_models_dir(models_dir)
    assert ups.names() == ["None", "Lanczos", "Nearest", "4x-Tiny", "abc", "R-ESRGAN 4x+"]
    by_name = {e.name: e for e in ups.entries()}
    assert by_name["4x-Tiny"].model_path == str(models_dir / "ESRGAN" / "4x-Tiny.pth")
    assert by_name["4x-Tiny"].scale == 4 and by_name["4x-Tiny"].model_name == "ESRGAN_4x"
    assert by_name["R-ESRGAN 4x+"].model_path is not None
    assert by_name["R-ESRGAN 4x+"].model_path.endswith("/RealESRGAN_x4plus.pth")
    assert by_name["Lanczos"].path is None and by_name["Lanczos"].model_path is None


def test_absent_a1111_names_say_which_file_goes_where(models_dir: Path) -> None:
    ups = Upscalers.in_models_dir(models_dir)
    folder = models_dir / "RealESRGAN"
    with pytest.raises(InvalidRequestError, match=rf"RealESRGAN_x4plus_anime_6B\.pth; place it in {folder}"):
        ups.find("R-ESRGAN 4x+ Anime6B")
    with pytest.raises(InvalidRequestError, match="SRVGGNet"):
        ups.find("R-ESRGAN General 4xV3")
    with pytest.raises(
        InvalidRequestError, match=r"'SwinIR 4x' is not available; choose one of None, Lanczos"
    ):
        check_upscaler("SwinIR 4x", ups)
    # Without folders only the built-ins exist.
    assert Upscalers().names() == ["None", "Lanczos", "Nearest"]


def test_resize_with_a_model_upscaler(models_dir: Path) -> None:
    ups = Upscalers.in_models_dir(models_dir)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    out = resize_image(0, img, 40, 24, upscaler="4x-Tiny", upscalers=ups)
    # By hand: one 4x pass (80x48 >= the target (40, 24)), then Lanczos down to 40x24.
    net = load_rrdbnet(models_dir / "ESRGAN" / "4x-Tiny.pth")
    expected = upscale_with_model(net, img).resize((40, 24), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    # The 2x model needs two passes for x3: 40x24, 80x48, then Lanczos to (60 // 8 * 8, 36 // 8 * 8).
    two = load_rrdbnet(models_dir / "ESRGAN" / "nested" / "abc.safetensors")
    out = resize_image(0, img, 60, 36, upscaler="abc", upscalers=ups)
    twice = upscale_with_model(two, upscale_with_model(two, img))
    expected = twice.resize((56, 32), Image.Resampling.LANCZOS).resize((60, 36), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def test_the_last_model_read_is_reused_until_its_file_changes(models_dir: Path) -> None:
    ups = Upscalers.in_models_dir(models_dir)
    entry = ups.find("4x-Tiny")
    first = ups.model(entry)
    assert ups.model(entry) is first
    write_tiny_rrdb(models_dir / "ESRGAN" / "4x-Tiny.pth", "old", nf=2, gc=4)
    assert ups.model(entry).shape.nf == 2


@pytest.mark.parametrize(("tile", "overlap"), [(-1, 0), (16, 16), (16, -1)])
def test_tile_settings_are_checked(tile: int, overlap: int) -> None:
    with pytest.raises(InvalidRequestError, match="overlap from 0 to below the tile"):
        Upscalers(tile=tile, tile_overlap=overlap)

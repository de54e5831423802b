"""A1111's extras routes and upscaler list over a tmp models folder holding a tiny ESRGAN file:
sizes, pixels and the ``Postprocess`` text derived by hand from A1111's upscale script."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.models.upscalers.tiled import upscale_with_model
from voidprompt.testing.tiny_upscalers import write_tiny_rrdb

pytest.importorskip("fastapi")

LANCZOS = Image.Resampling.LANCZOS


def _b64(image: Image.Image, parameters: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extras") / "models"
    write_tiny_rrdb(root / "ESRGAN" / "4x-Tiny.pth", "old", seed=11, nf=4, gc=4)
    return root


@pytest.fixture(scope="module")
def client(models: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from voidprompt.server.api import create_app
    from voidprompt.server.state import ServerConfig

    config = ServerConfig(
        ckpt_dirs=[models / "Stable-diffusion"],
        vae_dirs=[],
        lora_dir=None,
        embeddings_dir=None,
        hypernetwork_dir=None,
        styles_files=[],
        upscaler_dir=models,
        ui=False,
    )
    with TestClient(create_app(config)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")


def test_upscaler_list_has_a1111s_fields(client: Any, models: Path) -> None:
    items = client.get("/sdapi/v1/upscalers").json()
    assert [i["name"] for i in items] == ["None", "Lanczos", "Nearest", "4x-Tiny"]
    assert items[1] == {
        "name": "Lanczos",
        "model_name": None,
        "model_path": None,
        "model_url": None,
        "scale": 4.0,
    }
    assert items[3]["model_path"] == str(models / "ESRGAN" / "4x-Tiny.pth")
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["esrgan_models_path"] == str(models / "ESRGAN")


def test_scale_by_with_lanczos(client: Any, picture: Image.Image) -> None:
    body = {"image": _b64(picture, "a hill\nSteps: 3"), "upscaler_1": "Lanczos", "upscaling_resize": 2}
    answer = client.post("/sdapi/v1/extra-single-image", json=body)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["html_info"] == "<p>Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos</p>"
    out = _image(data["image"])
    np.testing.assert_array_equal(
        np.asarray(out.convert("RGB")), np.asarray(picture.resize((40, 24), LANCZOS))
    )
    # The source's parameters travel on, with the postprocessing text beside them.
    assert out.info["parameters"] == "a hill\nSteps: 3"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos"


def test_scale_by_with_the_model(client: Any, models: Path, picture: Image.Image) -> None:
    body = {"image": _b64(picture), "upscaler_1": "4x-Tiny", "upscaling_resize": 2}
    data = client.post("/sdapi/v1/extra-single-image", json=body).json()
    # One 4x pass (80x48 covers the target 40x24), then Lanczos down to it.
    net = load_rrdbnet(models / "ESRGAN" / "4x-Tiny.pth")
    expected = upscale_with_model(net, picture).resize((40, 24), LANCZOS)
    np.testing.assert_array_equal(np.asarray(_image(data["image"]).convert("RGB")), np.asarray(expected))


def test_scale_to_with_crop_and_a_second_upscaler(client: Any, picture: Image.Image) -> None:
    body = {
        "image": _b64(picture),
        "resize_mode": 1,
        "upscaling_resize_w": 50,
        "upscaling_resize_h": 30,
        "upscaler_1": "Lanczos",
        "upscaler_2": "Nearest",
        "extras_upscaler_2_visibility": 0.25,
    }
    data = client.post("/sdapi/v1/extra-single-image", json=body).json()
    assert data["html_info"] == (
        "<p>Postprocess upscale to: 50x30, Postprocess crop to: 50x30, Postprocess upscaler: Lanczos, "
        "Postprocess upscaler 2: Nearest</p>"
    )

    # Scale max(50/20, 30/12) = 2.5: one pass to 50x30, Lanczos to (48, 24) (floored to 8), then
    # centred on a black 50x30 canvas at (25 - 24, 15 - 12) = (1, 3).
    def one(resample: Image.Resampling) -> Image.Image:
        im = picture.resize((50, 30), resample).resize((48, 24), LANCZOS)
        canvas = Image.new("RGB", (50, 30))
        canvas.paste(im, (1, 3))
        return canvas

    expected = Image.blend(one(LANCZOS), one(Image.Resampling.NEAREST), 0.25)
    np.testing.assert_array_equal(np.asarray(_image(data["image"]).convert("RGB")), np.asarray(expected))


def test_batch(client: Any, picture: Image.Image) -> None:
    body = {
        "imageList": [
            {"data": _b64(picture), "name": "a.png"},
            {"data": _b64(picture.transpose(0)), "name": "b"},
        ],
        "upscaler_1": "Nearest",
        "upscaling_resize": 1.5,
    }
    data = client.post("/sdapi/v1/extra-batch-images", json=body).json()
    # 20x12 x1.5 = 30x18, floored to multiples of 8: 24x16.
    assert [_image(i).size for i in data["images"]] == [(24, 16), (24, 16)]
    assert data["html_info"] == "<p>Postprocess upscale by: 1.5, Postprocess upscaler: Nearest</p>"


def test_refusals(client: Any, picture: Image.Image, models: Path) -> None:
    image = _b64(picture)
    answer = client.post("/sdapi/v1/extra-single-image", json={"image": image, "gfpgan_visibility": 0.5})
    assert answer.status_code == 400 and "no face restorer is installed" in answer.text
    answer = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "SwinIR 4x"})
    assert answer.status_code == 400 and "'SwinIR 4x' is not available" in answer.text
    answer = client.post("/sdapi/v1/extra-single-image", json={"image": image, "upscaler_1": "R-ESRGAN 4x+"})
    assert answer.status_code == 400
    assert f"RealESRGAN_x4plus.pth; place it in {models / 'RealESRGAN'}" in answer.json()["detail"]
    answer = client.post("/sdapi/v1/extra-single-image", json={"image": image, "resize_mode": 2})
    assert answer.status_code == 422


def test_hires_accepts_a_model_upscaler_name(client: Any) -> None:
    # Checked while the request is built, before any model is needed; an absent file is named.
    body = {"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+ Anime6B", "steps": 1}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 400 and "RealESRGAN_x4plus_anime_6B.pth" in answer.text


def test_esrgan_tile_settings_reach_the_tiled_run(client: Any, models: Path, picture: Image.Image) -> None:
    # A1111's ESRGAN_tile / ESRGAN_tile_overlap settings: 8 px tiles overlapping by 2 cut the 20x12
    # picture into several tiles, which the default 192 px tile does not.
    net = load_rrdbnet(models / "ESRGAN" / "4x-Tiny.pth")
    body = {"image": _b64(picture), "upscaler_1": "4x-Tiny", "upscaling_resize": 4}
    try:
        tiles = {"ESRGAN_tile": 8, "ESRGAN_tile_overlap": 2}
        assert client.post("/sdapi/v1/options", json=tiles).status_code == 200
        assert client.get("/sdapi/v1/options").json()["ESRGAN_tile"] == 8
        data = client.post("/sdapi/v1/extra-single-image", json=body).json()
        expected = upscale_with_model(net, picture, tile=8, overlap=2)
        assert expected.tobytes() != upscale_with_model(net, picture).tobytes()
        np.testing.assert_array_equal(np.asarray(_image(data["image"]).convert("RGB")), np.asarray(expected))
        # An overlap as wide as the tile is refused before anything changes.
        answer = client.post("/sdapi/v1/options", json={"ESRGAN_tile_overlap": 8})
        assert answer.status_code == 400 and "overlap" in answer.json()["detail"]
        assert client.get("/sdapi/v1/options").json()["ESRGAN_tile_overlap"] == 2
    finally:
        client.post("/sdapi/v1/options", json={"ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8})

"""``/sdapi/v1/interrogate``: A1111's body and answers, DeepDanbooru and WD14 taggers from their
folders, "clip" refused with what it would need, an unknown model A1111's 404."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from voidprompt.models.taggers import deepdanbooru as ddb
from voidprompt.pipeline.interrogate import DeepDanbooruTagger
from voidprompt.testing.tiny_taggers import tiny_deepdanbooru, write_deepdanbooru, write_identity_wd14

pytest.importorskip("fastapi")

TAGS = ["1girl", "hat_(object)", "rating:safe", "solo"]


def _b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from voidprompt.server.api import create_app
    from voidprompt.server.state import ServerConfig

    root = tmp_path_factory.mktemp("interrogate")
    ddb_dir = root / "models" / "torch_deepdanbooru"
    ddb_dir.mkdir(parents=True)
    write_deepdanbooru(ddb_dir / "model-resnet_custom_v3.pt", tiny_deepdanbooru(TAGS, stem=4, seed=7))
    # A 1x1 tagger: three values (B, G, R), the first two general tags, the third a character.
    write_identity_wd14(root / "models" / "wd14" / "wd-tiny", 1, [0, 0, 4])
    config = ServerConfig(
        ckpt_dirs=[root / "models" / "Stable-diffusion"],
        vae_dirs=[],
        lora_dir=None,
        embeddings_dir=None,
        hypernetwork_dir=None,
        styles_files=[],
        deepdanbooru_dir=ddb_dir,
        wd14_dir=root / "models" / "wd14",
        ui=False,
    )
    with TestClient(create_app(config)) as test_client:
        yield test_client


def test_deepdanbooru_answers_a1111s_caption(client: Any, tmp_path: Path) -> None:
    picture = Image.new("RGB", (64, 40), (200, 30, 90))
    response = client.post("/sdapi/v1/interrogate", json={"image": _b64(picture), "model": "deepdanbooru"})
    assert response.status_code == 200, response.text
    # The same network and A1111's rules, run here directly.
    net = tiny_deepdanbooru(TAGS, stem=4, seed=7)
    tagger = DeepDanbooruTagger(net)
    expected = ddb.caption(tagger.tag(picture))
    assert expected  # the seed gives tags above 0.5, so the caption says something
    assert response.json() == {"caption": expected}


def test_a_wd14_tagger_by_its_folder_name(client: Any) -> None:
    # One pixel (R, G, B) = (255, 230, 0): the tagger reads B, G, R over 255 -> 0, 0.902, 1.0.
    picture = Image.new("RGB", (1, 1), (255, 230, 0))
    response = client.post("/sdapi/v1/interrogate", json={"image": _b64(picture), "model": "wd-tiny"})
    assert response.status_code == 200, response.text
    assert response.json() == {"caption": "tag 2, tag 1"}


def test_an_unknown_model_is_a1111s_404(client: Any) -> None:
    picture = _b64(Image.new("RGB", (8, 8)))
    response = client.post("/sdapi/v1/interrogate", json={"image": picture, "model": "../wd14/wd-tiny"})
    assert response.status_code == 404
    assert response.json() == {
        "error": "HTTPException",
        "detail": "Model not found",
        "body": "",
        "errors": "404: Model not found",
    }


def test_clip_names_what_it_would_need(client: Any) -> None:
    # A1111's default model is "clip".
    response = client.post("/sdapi/v1/interrogate", json={"image": _b64(Image.new("RGB", (8, 8)))})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "BLIP" in detail and "model_base_caption_capfilt_large.pth" in detail
    assert '"deepdanbooru"' in detail


def test_an_empty_image_is_a_request_error(client: Any) -> None:
    response = client.post("/sdapi/v1/interrogate", json={"image": "", "model": "deepdanbooru"})
    assert response.status_code == 400
    assert "image: empty" in response.json()["detail"]


def test_a_missing_deepdanbooru_file_says_where_to_place_it(tmp_path: Path) -> None:
    from voidprompt.models.taggers.result import TaggerError
    from voidprompt.server.routes.sdapi_interrogate import TaggerHost

    host = TaggerHost(tmp_path / "torch_deepdanbooru", tmp_path / "wd14")
    assert host.names() == ["deepdanbooru"]
    with pytest.raises(TaggerError, match=r"model-resnet_custom_v3\.pt"):
        host.get("deepdanbooru")


def test_serve_flags_name_the_tagger_folders(tmp_path: Path) -> None:
    from voidprompt.server.cli import _parser, build_config

    defaults = build_config(_parser().parse_args(["--no-miniature"]))
    assert defaults.deepdanbooru_dir == Path("models/torch_deepdanbooru")  # type: ignore[attr-defined]
    assert defaults.wd14_dir == Path("models/wd14")  # type: ignore[attr-defined]
    argv = ["--no-miniature", "--deepdanbooru-dir", str(tmp_path / "d"), "--wd14-dir", str(tmp_path / "w")]
    config = build_config(_parser().parse_args(argv))
    assert config.deepdanbooru_dir == tmp_path / "d"  # type: ignore[attr-defined]
    assert config.wd14_dir == tmp_path / "w"  # type: ignore[attr-defined]


def test_webuiapi_interrogate(server_tools: Any, tmp_path: Path) -> None:
    webuiapi = pytest.importorskip("webuiapi")
    make_config, start_server = server_tools
    ddb_dir = tmp_path / "torch_deepdanbooru"
    ddb_dir.mkdir()
    net = tiny_deepdanbooru(TAGS, stem=4, seed=7)
    write_deepdanbooru(ddb_dir / "model-resnet_custom_v3.pt", net)
    write_identity_wd14(tmp_path / "wd14" / "wd-tiny", 1, [0, 0, 4])
    config = make_config(tmp_path, None, deepdanbooru_dir=ddb_dir, wd14_dir=tmp_path / "wd14")
    picture = Image.new("RGB", (1, 1), (255, 230, 0))
    for running in start_server(config):
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port)
        # webuiapi sends raw base64 (no data: prefix) and reads "caption" into the result's info.
        assert api.interrogate(picture, model="wd-tiny").info == "tag 2, tag 1"
        expected = ddb.caption(DeepDanbooruTagger(net).tag(picture))
        assert api.interrogate(picture, model="deepdanbooru").info == expected
        with pytest.raises(RuntimeError, match="404"):
            api.interrogate(picture, model="nope")

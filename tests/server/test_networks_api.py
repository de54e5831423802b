"""/sdapi/v1/loras, /embeddings and /hypernetworks over real files, and their use in generation."""

from __future__ import annotations

import base64
import io
import json
import os
from collections import OrderedDict
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from voidprompt.infotext import parse_generation_parameters

TINY_WIDTH = 32  # the tiny checkpoint's text encoder width (and cross-attention context width)


class _Evil:
    """Pickles as a call to os.system: a loader that unpickles freely would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _hypernetwork_file(path: Path, width: int, seed: int = 0) -> None:
    """An A1111 hypernetwork .pt: layer structure [1, 2, 1], linear, one (k, v) MLP pair per width."""
    g = torch.Generator().manual_seed(seed)
    obj: dict[object, object] = {
        "layer_structure": [1, 2, 1],
        "activation_func": "linear",
        "is_layer_norm": False,
        "use_dropout": False,
        "activate_output": False,
        "name": path.stem,
        "step": 10,
    }
    pair = []
    for _ in range(2):
        state = OrderedDict()
        for index, (n_in, n_out) in zip((0, 1), ((1, 2), (2, 1)), strict=True):
            state[f"linear.{index}.weight"] = torch.randn(width * n_out, width * n_in, generator=g) * 0.3
            state[f"linear.{index}.bias"] = torch.randn(width * n_out, generator=g) * 0.1
        pair.append(state)
    obj[width] = tuple(pair)
    torch.save(obj, path)


@pytest.fixture()
def folders(tmp_path: Path, tiny_checkpoint: Path) -> dict[str, Path]:
    """Real network files: a LoRA extracted from two tiny checkpoints, one with kohya metadata,
    embeddings of the right and a wrong width, a hypernetwork, and hostile pickles."""
    from voidprompt.models.networks.extract import extract_lora
    from voidprompt.models.networks.hypernetworks import load_hypernetwork
    from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

    root = tmp_path / "server"
    lora = root / "models" / "Lora"
    emb = root / "embeddings"
    hyper = root / "models" / "hypernetworks"
    for folder in (lora / "sub", emb / "negatives", hyper):
        folder.mkdir(parents=True)
    marker = tmp_path / "pwned"

    other = write_tiny_checkpoint(tmp_path / "other.safetensors", seed=1)
    extract_lora(tiny_checkpoint, other, lora / "style.safetensors", rank=2)
    gen = torch.Generator().manual_seed(0)
    save_file(
        {"lora_unet_x.lora_up.weight": torch.randn(4, 2, generator=gen)},
        str(lora / "sub" / "fancy.safetensors"),
        metadata={
            "ss_output_name": "Fancy Alias",
            "ss_tag_frequency": json.dumps({"set": {"cat": 3}}),
            "ss_note": "{not json",
        },
    )
    torch.save({"x": torch.zeros(2)}, lora / "sub" / "style.ckpt")  # same name deeper: not listed
    torch.save({"payload": _Evil(marker)}, lora / "sub" / "evil.pt")
    (lora / "README.txt").write_text("not a network")

    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(2, TINY_WIDTH, generator=gen)},
            "name": "vpstyle",
            "step": 3000,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "tiny",
        },
        emb / "vpstyle.pt",
    )
    save_file(
        {"emb_params": torch.randn(3, TINY_WIDTH, generator=gen)},
        str(emb / "negatives" / "vpneg.safetensors"),
    )
    save_file({"emb_params": torch.zeros(4, 768)}, str(emb / "vpwide.safetensors"))
    torch.save({"string_to_param": {"*": _Evil(marker)}}, emb / "evil.pt")
    (emb / "broken.safetensors").write_bytes(b"\xff" * 64)

    _hypernetwork_file(hyper / "vphyper.pt", TINY_WIDTH)
    assert load_hypernetwork(hyper / "vphyper.pt").layers  # the repo's loader accepts it
    _hypernetwork_file(hyper / "None.pt", TINY_WIDTH)  # A1111 never lists one named "None"
    return {"root": root, "lora": lora, "emb": emb, "hyper": hyper, "marker": marker}


def _image(data: dict[str, object]) -> bytes:
    images = data["images"]
    assert isinstance(images, list)
    return Image.open(io.BytesIO(base64.b64decode(images[0]))).convert("RGB").tobytes()


def test_listings_match_the_files_and_feed_generation(folders, tiny_checkpoint, server_tools) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.models.hashes import sha256_file
    from voidprompt.models.networks.lora import lora_hash
    from voidprompt.server.networks import safetensors_metadata

    make_config, start_server = server_tools
    lora, emb, hyper, marker = folders["lora"], folders["emb"], folders["hyper"], folders["marker"]
    config = make_config(folders["root"], tiny_checkpoint)
    for running in start_server(config):
        with httpx.Client(base_url=running.url, timeout=120) as http:
            loras = http.get("/sdapi/v1/loras").json()
            assert [x["name"] for x in loras] == ["evil", "fancy", "style"]
            by_name = {x["name"]: x for x in loras}
            assert by_name["style"]["path"] == str(lora / "style.safetensors")  # the folder's own file wins
            assert by_name["style"]["alias"] == "style"
            style_meta = by_name["style"]["metadata"]
            assert style_meta["ss_network_dim"] == "2"
            assert style_meta["ss_network_args"] == {}  # a JSON object in the header comes back decoded
            assert style_meta["voidprompt.extract"]["rank"] == 2
            assert by_name["fancy"] == {
                "name": "fancy",
                "alias": "Fancy Alias",
                "path": str(lora / "sub" / "fancy.safetensors"),
                "metadata": {
                    "ss_output_name": "Fancy Alias",
                    "ss_tag_frequency": {"set": {"cat": 3}},
                    "ss_note": "{not json",
                },
            }
            assert by_name["evil"]["metadata"] == {} and by_name["evil"]["alias"] == "evil"

            # Before any generation (no model in memory) "loaded" is decided by the checkpoint's
            # text width read from its header: 32 here.
            embeddings = http.get("/sdapi/v1/embeddings").json()
            assert embeddings == {
                "loaded": {
                    "vpneg": {
                        "step": None,
                        "sd_checkpoint": None,
                        "sd_checkpoint_name": None,
                        "shape": TINY_WIDTH,
                        "vectors": 3,
                    },
                    "vpstyle": {
                        "step": 3000,
                        "sd_checkpoint": "abcdef12",
                        "sd_checkpoint_name": "tiny",
                        "shape": TINY_WIDTH,
                        "vectors": 2,
                    },
                },
                "skipped": {
                    "vpwide": {
                        "step": None,
                        "sd_checkpoint": None,
                        "sd_checkpoint_name": None,
                        "shape": 768,
                        "vectors": 4,
                    }
                },
            }
            assert http.get("/sdapi/v1/hypernetworks").json() == [
                {"name": "vphyper", "path": str(hyper / "vphyper.pt")}
            ]
            flags = http.get("/sdapi/v1/cmd-flags").json()
            assert (flags["lora_dir"], flags["embeddings_dir"], flags["hypernetwork_dir"]) == (
                str(lora),
                str(emb),
                str(hyper),
            )

            # The prompt's networks are applied: their hashes are in the infotext, the image changes.
            body = {"seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
            plain = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat"}).json()
            tagged = http.post(
                "/sdapi/v1/txt2img",
                json={**body, "prompt": "a cat vpstyle <lora:style:1> <hypernet:vphyper:0.5>"},
            )
            assert tagged.status_code == 200, tagged.text
            params = parse_generation_parameters(json.loads(tagged.json()["info"])["infotexts"][0])
            style = lora / "style.safetensors"
            assert params["Lora hashes"] == f"style: {lora_hash(style, safetensors_metadata(style))[:12]}"
            assert params["TI hashes"] == f"vpstyle: {sha256_file(emb / 'vpstyle.pt')[:12]}"
            assert params["Hypernet hashes"] == f"vphyper: {sha256_file(hyper / 'vphyper.pt')[:10]}"
            assert _image(tagged.json()) != _image(plain)
            # An embedding of the wrong width is refused by name, not silently read as text.
            wide = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "vpwide"})
            assert wide.status_code == 400 and "vpwide" in wide.json()["detail"]

            # New files show after a refresh (not before); the model in memory gets new embeddings.
            save_file({"a.lora_up.weight": torch.zeros(2, 2)}, str(lora / "late.safetensors"))
            save_file({"emb_params": torch.ones(1, TINY_WIDTH)}, str(emb / "vplate.safetensors"))
            assert "late" not in [x["name"] for x in http.get("/sdapi/v1/loras").json()]
            assert "vplate" not in http.get("/sdapi/v1/embeddings").json()["loaded"]
            assert http.post("/sdapi/v1/refresh-loras").status_code == 200
            assert http.post("/sdapi/v1/refresh-embeddings").status_code == 200
            assert [x["name"] for x in http.get("/sdapi/v1/loras").json()] == [
                "evil",
                "fancy",
                "late",
                "style",
            ]
            assert http.get("/sdapi/v1/embeddings").json()["loaded"]["vplate"]["vectors"] == 1
            late = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat vplate"}).json()
            late_params = parse_generation_parameters(json.loads(late["info"])["infotexts"][0])
            assert late_params["TI hashes"] == f"vplate: {sha256_file(emb / 'vplate.safetensors')[:12]}"
            (emb / "vplate.safetensors").unlink()
            assert http.post("/sdapi/v1/refresh-embeddings").status_code == 200
            assert "vplate" not in http.get("/sdapi/v1/embeddings").json()["loaded"]
    # Listing and loading never ran the hostile pickles.
    assert not marker.exists()


def test_embeddings_fit_the_current_model(tmp_path: Path, tiny_checkpoint: Path, server_tools) -> None:  # type: ignore[no-untyped-def]
    """With no checkpoint every readable embedding is "loaded" (A1111 with no model); the split
    follows the text width of the selected checkpoint."""
    make_config, start_server = server_tools
    root = tmp_path / "bare"
    (root / "embeddings").mkdir(parents=True)
    # Embedding suffixes match in any case, as the engine's embedding loader matches them.
    save_file({"emb_params": torch.zeros(1, TINY_WIDTH)}, str(root / "embeddings" / "narrow.SAFETENSORS"))
    save_file({"emb_params": torch.zeros(2, 768)}, str(root / "embeddings" / "wide.safetensors"))
    for running in start_server(make_config(root, None)):
        data = httpx.get(f"{running.url}/sdapi/v1/embeddings").json()
        assert sorted(data["loaded"]) == ["narrow", "wide"] and data["skipped"] == {}
        assert httpx.get(f"{running.url}/sdapi/v1/loras").json() == []
        assert httpx.get(f"{running.url}/sdapi/v1/hypernetworks").json() == []
    for running in start_server(make_config(root, tiny_checkpoint)):
        data = httpx.get(f"{running.url}/sdapi/v1/embeddings").json()
        assert list(data["loaded"]) == ["narrow"] and list(data["skipped"]) == ["wide"]


def test_folder_flags() -> None:
    from voidprompt.server.cli import _parser, build_config

    defaults = build_config(_parser().parse_args(["--no-miniature"]))
    assert (defaults.lora_dir, defaults.embeddings_dir, defaults.hypernetwork_dir) == (  # type: ignore[attr-defined]
        Path("models/Lora"),
        Path("embeddings"),
        Path("models/hypernetworks"),
    )
    given = build_config(
        _parser().parse_args(
            ["--no-miniature", "--lora-dir", "/x/l", "--embeddings-dir", "/x/e", "--hypernetwork-dir", "/x/h"]
        )
    )
    assert (given.lora_dir, given.embeddings_dir, given.hypernetwork_dir) == (  # type: ignore[attr-defined]
        Path("/x/l"),
        Path("/x/e"),
        Path("/x/h"),
    )

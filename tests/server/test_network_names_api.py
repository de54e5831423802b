"""Over the HTTP API a prompt can load only the networks its folders list: a path in a tag (traversal
or absolute) is an unknown network, and the answer is the same whether or not a file is there."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import torch
from PIL import Image
from safetensors.torch import save_file

from voidprompt.infotext import parse_generation_parameters

LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"


def _lora(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{LAYER}.lora_up.weight": torch.full((32, 1), 0.5),
        f"{LAYER}.lora_down.weight": torch.full((1, 32), 0.25),
        f"{LAYER}.alpha": torch.tensor(1.0),
    }
    save_file(tensors, str(path))


def test_paths_in_network_tags_load_nothing_and_reveal_nothing(
    tmp_path: Path, tiny_checkpoint, server_tools
) -> None:  # type: ignore[no-untyped-def]
    make_config, start_server = server_tools
    root = tmp_path / "srv"
    _lora(root / "models" / "Lora" / "inside.safetensors")
    _lora(tmp_path / "secret.safetensors")  # the same LoRA, outside every configured folder
    (root / "models" / "hypernetworks").mkdir(parents=True)
    (tmp_path / "secret.pt").write_bytes(b"not a hypernetwork")
    config = make_config(root, tiny_checkpoint)
    body = {"seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    for running in start_server(config):
        with httpx.Client(base_url=running.url, timeout=120) as http:

            def generate(tags: str) -> tuple[bytes, dict[str, object]]:
                reply = http.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat " + tags})
                assert reply.status_code == 200, reply.text
                data = reply.json()
                info = parse_generation_parameters(json.loads(data["info"])["infotexts"][0])
                pixels = Image.open(io.BytesIO(base64.b64decode(data["images"][0]))).convert("RGB").tobytes()
                return pixels, info

            plain, _ = generate("")
            inside, info = generate("<lora:inside:1>")
            assert inside != plain and "Lora hashes" in info  # the LoRA itself does change the image
            for existing, missing in [
                ("../../../secret", "../../../nothing"),
                (str(tmp_path / "secret"), str(tmp_path / "nothing")),
            ]:
                found_image, found_info = generate(f"<lora:{existing}:1> <hypernet:{existing}:1>")
                absent_image, absent_info = generate(f"<lora:{missing}:1> <hypernet:{missing}:1>")
                assert found_image == absent_image == plain
                assert "Lora hashes" not in found_info and "Hypernet hashes" not in found_info
                assert {k: v for k, v in found_info.items() if k != "Prompt"} == {
                    k: v for k, v in absent_info.items() if k != "Prompt"
                }

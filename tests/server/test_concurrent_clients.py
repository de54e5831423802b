"""Concurrent clients on the tiny checkpoint: every image carries its own seed and is the image that
seed gives alone. The same on the shipped model with 20 clients is test_load_abuse.py's (slow)."""

from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from PIL import Image

from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters


def _body(client: int, seed: int) -> dict[str, object]:
    # Ancestral: every step draws from the image's own RNG, so a request given another's noise shows.
    return {"prompt": f"client {client}", "seed": seed, "steps": 2, "width": 32, "height": 32,
            "sampler_name": "Euler a"}  # fmt: skip


def test_four_concurrent_clients_each_get_their_own_seed(server: Any) -> None:
    def client(index: int) -> list[tuple[int, dict[str, Any], bytes]]:
        out = []
        with httpx.Client(base_url=server.url, timeout=120) as http:
            for k in range(3):
                seed = 500 + 10 * index + k
                response = http.post("/sdapi/v1/txt2img", json=_body(index, seed))
                assert response.status_code == 200, response.text
                data = response.json()
                out.append((seed, json.loads(data["info"]), base64.b64decode(data["images"][0])))
        return out

    with ThreadPoolExecutor(4) as pool:
        results = [r for chunk in pool.map(client, range(4)) for r in chunk]
    assert sorted(seed for seed, _, _ in results) == sorted(
        500 + 10 * i + k for i in range(4) for k in range(3)
    )
    pixels = {}
    for seed, info, png in results:
        assert info["seed"] == seed and info["all_seeds"] == [seed]
        with Image.open(io.BytesIO(png)) as image:
            text, _ = read_infotext(image)
            pixels[seed] = image.convert("RGB").tobytes()
        assert str(parse_generation_parameters(text or "")["Seed"]) == str(seed)
        assert text == info["infotexts"][0]
    assert len(set(pixels.values())) == len(results)  # no request got another one's noise
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for index, k in ((0, 0), (3, 2)):
            seed = 500 + 10 * index + k
            alone = http.post("/sdapi/v1/txt2img", json=_body(index, seed)).json()
            with Image.open(io.BytesIO(base64.b64decode(alone["images"][0]))) as image:
                assert image.convert("RGB").tobytes() == pixels[seed], seed

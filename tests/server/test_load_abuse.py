"""Bounded load and abuse on loopback: concurrent clients, hostile requests, auth, CORS, limits."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters


def _txt2img(url: str, seed: int, **extra: object) -> httpx.Response:
    body = {
        "prompt": "p",
        "seed": seed,
        "steps": 1,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        **extra,
    }
    return httpx.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)


LOAD_STEPS = 4


@pytest.mark.slow  # 100 requests from 20 concurrent clients on the shipped model
def test_twenty_clients_five_requests_each(mini_server) -> None:  # type: ignore[no-untyped-def]
    """20 concurrent clients x 5 txt2img requests on the miniature model: all succeed, and every
    image carries its own seed - in the info JSON, in its PNG infotext, and in its pixels (a seed
    regenerated alone afterwards gives the same bytes as under load)."""
    from voidprompt.demo.miniature import MINIATURE_FILENAME

    def body(index: int, seed: int) -> dict[str, object]:
        return {
            "prompt": f"client {index}",
            "seed": seed,
            "steps": LOAD_STEPS,
            "width": 64,
            "height": 64,
            "sampler_name": "Euler a",  # ancestral: every step draws from the image's own RNG
        }

    def client(index: int) -> list[tuple[int, dict[str, object], dict[str, object], bytes]]:
        out = []
        with httpx.Client(timeout=600) as http:
            for k in range(5):
                seed = 1000 + 10 * index + k
                response = http.post(f"{mini_server.url}/sdapi/v1/txt2img", json=body(index, seed))
                assert response.status_code == 200, response.text
                data = response.json()
                assert len(data["images"]) == 1
                out.append(
                    (seed, data["parameters"], json.loads(data["info"]), base64.b64decode(data["images"][0]))
                )
        return out

    with ThreadPoolExecutor(20) as pool:
        results = [r for chunk in pool.map(client, range(20)) for r in chunk]
    assert len(results) == 100
    assert sorted(seed for seed, *_ in results) == sorted(
        1000 + 10 * i + k for i in range(20) for k in range(5)
    )
    model_name = MINIATURE_FILENAME.rsplit(".", 1)[0]
    pixels: dict[int, bytes] = {}
    for seed, parameters, info, png in results:
        assert parameters["seed"] == seed
        assert info["seed"] == seed and info["all_seeds"] == [seed]
        assert info["sd_model_name"] == model_name
        image = Image.open(io.BytesIO(png))
        assert image.size == (64, 64)
        text, _ = read_infotext(image)
        params = parse_generation_parameters(text or "")
        assert str(params["Seed"]) == str(seed)
        assert params["Prompt"] == info["prompt"] == info["all_prompts"][0]  # type: ignore[index]
        assert str(params["Steps"]) == str(LOAD_STEPS)
        assert params["Model"] == model_name
        assert text == info["infotexts"][0]  # type: ignore[index]
        pixels[seed] = image.convert("RGB").tobytes()
    # Different seeds give different images (a request never got another one's noise) ...
    assert len(set(pixels.values())) == 100
    # ... and the image of a seed is the one that seed gives alone.
    with httpx.Client(base_url=mini_server.url, timeout=120) as http:
        for index, k in ((0, 0), (7, 3), (19, 4)):
            seed = 1000 + 10 * index + k
            again = http.post("/sdapi/v1/txt2img", json=body(index, seed)).json()
            alone = Image.open(io.BytesIO(base64.b64decode(again["images"][0]))).convert("RGB").tobytes()
            assert alone == pixels[seed], seed


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG declaring width x height pixels with a few bytes of data: decoding it would need 10 GB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + _png_chunk(b"IEND", b"")
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return _b64(buffer.getvalue())


def hostile_requests() -> list[tuple[str, str, dict[str, object]]]:
    """(method, path, httpx kwargs) for 100 malformed or hostile requests."""
    t2i = "/sdapi/v1/txt2img"
    i2i = "/sdapi/v1/img2img"
    ok = {"steps": 1, "width": 64, "height": 64}
    cases: list[tuple[str, str, dict[str, object]]] = []
    # Bad JSON and wrong content.
    for raw in (
        b"{",
        b"[1,2",
        b"not json",
        b"\xff\xfe\x00",
        b'{"prompt": }',
        b"null",
        b"[]",
        b"123",
        b'"str"',
        b'{"steps": 1,}',
    ):
        cases.append(("POST", t2i, {"content": raw, "headers": {"content-type": "application/json"}}))
    # Wrong types.
    for field, value in (
        ("steps", "many"),
        ("width", [64]),
        ("height", {"a": 1}),
        ("seed", "x1"),
        ("cfg_scale", "hot"),
        ("batch_size", "1.5"),  # a number is truncated, as A1111 does; text is not a number
        ("n_iter", None),
        ("prompt", {"x": 1}),
        ("styles", "abc"),
        ("override_settings", [1, 2]),
    ):
        cases.append(("POST", t2i, {"json": {**ok, field: value}}))
    # Huge or impossible sizes and counts.
    for field, value in (
        ("width", 100_000),
        ("height", 1 << 40),
        ("width", -64),
        ("height", 0),
        ("width", 65),
        ("steps", 10_000),
        ("steps", 0),
        ("steps", -5),
        ("batch_size", 10_000),
        ("batch_size", 0),
        ("n_iter", 1_000_000),
        ("cfg_scale", float("1e308")),
        ("subseed_strength", 5.0),
        ("enable_hr", True),
    ):
        body = {**ok, field: value}
        if field == "enable_hr":
            body["hr_scale"] = 100.0
        cases.append(
            (
                "POST",
                t2i,
                {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}},
            )
        )
    # Unknown names and path traversal in model / VAE / sampler / study names.
    for name in (
        "../../etc/passwd",
        "/etc/passwd",
        "..\\..\\windows\\win.ini",
        "tiny.safetensors/../../x",
        "nonexistent.ckpt",
        "%2e%2e%2fetc%2fpasswd",
        "\x00",
        "a" * 5000,
    ):
        cases.append(("POST", t2i, {"json": {**ok, "override_settings": {"sd_model_checkpoint": name}}}))
        cases.append(("POST", "/sdapi/v1/options", {"json": {"sd_model_checkpoint": name}}))
    for name in ("../../etc/passwd", "/etc/passwd", "nope.vae.pt"):
        cases.append(("POST", "/sdapi/v1/options", {"json": {"sd_vae": name}}))
    for sampler in ("../Euler", "nope", "", "Euler; rm -rf /"):
        if sampler:
            cases.append(("POST", t2i, {"json": {**ok, "sampler_name": sampler}}))
    for scheduler in ("weird", "../karras"):
        cases.append(("POST", t2i, {"json": {**ok, "scheduler": scheduler}}))
    for study in ("..", "..%2F..%2Fetc", "%2e%2e", "nope", "a~..~b"):
        cases.append(("GET", f"/voidprompt/v1/studies/{study}/images", {}))
        cases.append(("PUT", f"/voidprompt/v1/studies/{study}/labels/1", {"json": {"label_class": "x"}}))
        cases.append(("GET", f"/voidprompt/v1/studies/{study}/report", {}))
        cases.append(("GET", f"/voidprompt/v1/studies/{study}/report/figures/..%2F..%2Fcatalog.sqlite", {}))
    # Options: unknown keys and wrong types.
    cases.append(("POST", "/sdapi/v1/options", {"json": {"no_such_option": 1}}))
    cases.append(("POST", "/sdapi/v1/options", {"json": {"CLIP_stop_at_last_layers": "two"}}))
    cases.append(("POST", "/sdapi/v1/options", {"json": {"randn_source": "quantum"}}))
    cases.append(("POST", "/sdapi/v1/options", {"json": [1, 2, 3]}))
    cases.append(("POST", t2i, {"json": {**ok, "override_settings": {"emphasis": "Loud"}}}))
    # Bad images: base64, non-images, a decompression bomb.
    bomb = _b64(bomb_png())
    for image in (
        "!!!notbase64!!!",
        "data:image/png;base64,@@@",
        _b64(b"GIF89a-not-really"),
        _b64(b"\x00" * 100),
        "",
        bomb,
        "data:image/png;base64," + bomb,
    ):
        cases.append(("POST", i2i, {"json": {**ok, "init_images": [image]}}))
        cases.append(("POST", "/sdapi/v1/png-info", {"json": {"image": image or "x"}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": [_tiny_png()], "mask": "%%%"}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": [_tiny_png()], "mask": bomb}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": []}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": [_tiny_png()], "resize_mode": 9}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": [_tiny_png()], "denoising_strength": 3}}))
    cases.append(("POST", i2i, {"json": {**ok, "init_images": [_tiny_png()], "inpainting_fill": -1}}))
    # Oversized bodies: declared and streamed (chunked, no length).
    cases.append(
        (
            "POST",
            t2i,
            {
                "content": b"{" + b" " * (3 * 1024 * 1024) + b"}",
                "headers": {"content-type": "application/json"},
            },
        )
    )

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b" " * (100 * 1024)

    cases.append(("POST", t2i, {"content": chunks(), "headers": {"content-type": "application/json"}}))
    # Features voidprompt does not have, and scripts.
    cases.append(("POST", t2i, {"json": {**ok, "restore_faces": True}}))
    cases.append(("POST", t2i, {"json": {**ok, "alwayson_scripts": {"ADetailer": {"args": [True]}}}}))
    cases.append(("POST", t2i, {"json": {**ok, "script_name": "x/y/z plot"}}))
    cases.append(("POST", t2i, {"json": {**ok, "prompt": "x" * 30_000}}))
    cases.append(("POST", t2i, {"json": {**ok, "infotext": "a " * 2_000_000}}))  # refused before parsing
    cases.append(("POST", "/voidprompt/v1/tokens", {"json": {"text": "x", "emphasis": "Loud"}}))
    cases.append(("GET", "/sdapi/v1/no-such-route", {}))
    cases.append(("DELETE", "/sdapi/v1/txt2img", {}))
    return cases


def test_hundred_hostile_requests_get_4xx_and_the_server_keeps_serving(server) -> None:  # type: ignore[no-untyped-def]
    cases = hostile_requests()
    assert len(cases) >= 100
    failures = []
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for method, path, kwargs in cases:
            response = http.request(method, path, **kwargs)  # type: ignore[arg-type]
            if not 400 <= response.status_code < 500:
                failures.append((method, path, str(kwargs)[:120], response.status_code, response.text[:200]))
    assert not failures, failures
    # Still serving, and correctly.
    response = _txt2img(server.url, 4242)
    assert response.status_code == 200
    assert json.loads(response.json()["info"])["all_seeds"] == [4242]


def test_specific_statuses_and_messages(server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post(
            "/sdapi/v1/txt2img", json={"steps": 1, "width": 64, "height": 64, "sampler_name": "nope"}
        )
        assert r.status_code == 400 and "Euler a" in r.json()["detail"]
        r = http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
        assert r.status_code == 404 and "tiny.safetensors [" in r.json()["detail"]
        r = http.post("/sdapi/v1/png-info", json={"image": _b64(bomb_png())})
        assert r.status_code == 413
        r = http.post("/sdapi/v1/txt2img", json={"steps": 1, "width": 4096, "height": 4096})
        assert r.status_code == 400 and "--max-pixels" in r.json()["detail"]
        r = http.post(
            "/sdapi/v1/txt2img",
            content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        # No CORS unless configured.
        r = http.get("/sdapi/v1/samplers", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


def test_a_missing_script_is_answered_as_a1111_does(server) -> None:  # type: ignore[no-untyped-def]
    """A1111 without an extension answers its scripts with 422 "Script '<name>' not found" (its
    script_name_to_index), selectable or always-on: ControlNet-LLLite's requests get that here too."""
    body = {"prompt": "q", "seed": 8, "steps": 1, "width": 64, "height": 64}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for extra, name in (
            # A1111's own Prompt matrix script, which voidprompt does not have.
            ({"script_name": "prompt matrix"}, "prompt matrix"),
            ({"alwayson_scripts": {"ControlNet": {"args": [{"model": "lllite"}]}}}, "ControlNet"),
        ):
            r = http.post("/sdapi/v1/txt2img", json={**body, **extra})
            assert r.status_code == 422, r.text
            assert r.json()["detail"] == f"Script '{name}' not found"


def test_client_conventions(server) -> None:  # type: ignore[no-untyped-def]
    """scheduler "automatic" in any case, sampler_index, eta=1, unknown extra fields, infotext pre-fill."""
    with httpx.Client(base_url=server.url, timeout=120) as http:
        body = {
            "prompt": "q",
            "seed": 8,
            "steps": 1,
            "width": 64,
            "height": 64,
            "scheduler": "AUTOMATIC",
            "sampler_index": "Euler a",
            "eta": 1,
            "some_extension_field": {"x": 1},
            "alwayson_scripts": {},  # what webuiapi sends when no extension is used
            "seed_resize_from_h": 0,
            "seed_resize_from_w": 0,
            "s_tmax": 0,
        }
        r = http.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sampler_name"] == "Euler a"
        assert info["seed_resize_from_h"] == -1
        first = info["infotexts"][0]
        # infotext pre-fills everything the client did not set; explicit fields win.
        r = http.post("/sdapi/v1/txt2img", json={"infotext": first, "prompt": "other"})
        assert r.status_code == 200, r.text
        again = json.loads(r.json()["info"])
        assert again["seed"] == 8 and again["steps"] == 1 and again["width"] == 64
        assert again["sampler_name"] == "Euler a"
        assert again["prompt"] == "other"
        # send_images=false returns no images but the info.
        r = http.post("/sdapi/v1/txt2img", json={**body, "send_images": False})
        assert r.json()["images"] == [] and json.loads(r.json()["info"])["all_seeds"] == [8]


def test_progress_and_probe_routes(server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        progress = http.get("/sdapi/v1/progress").json()
        assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
        for key in (
            "job",
            "job_count",
            "job_no",
            "sampling_step",
            "sampling_steps",
            "interrupted",
            "skipped",
        ):
            assert key in progress["state"]
        for route, kind in (
            ("scripts", dict),
            ("script-info", list),
            ("extensions", list),
            ("loras", list),
            ("embeddings", dict),
            ("hypernetworks", list),
            ("memory", dict),
            ("cmd-flags", dict),
            ("upscalers", list),
            ("latent-upscale-modes", list),
            ("prompt-styles", list),
            ("face-restorers", list),
            ("sd-vae", list),
            ("schedulers", list),
        ):
            r = http.get(f"/sdapi/v1/{route}")
            assert r.status_code == 200 and isinstance(r.json(), kind), route
        assert http.get("/sdapi/v1/cmd-flags").json()["api_auth"] is None
        assert {m["name"] for m in http.get("/sdapi/v1/latent-upscale-modes").json()} >= {"Latent"}
        for route in ("refresh-checkpoints", "refresh-vae", "refresh-embeddings", "refresh-loras", "skip"):
            assert http.post(f"/sdapi/v1/{route}").status_code == 200
        tokens = http.post("/voidprompt/v1/tokens", json={"text": "a cat, (blue:1.2) sky"}).json()
        assert tokens["target"] == 75
        assert tokens["report"].startswith(f"tokens: {tokens['token_count']}/75")
        assert 0 < tokens["token_count"] < 75
        schema = http.get("/openapi.json").json()
        assert "/sdapi/v1/txt2img" in schema["paths"]
        txt2img = schema["paths"]["/sdapi/v1/txt2img"]["post"]
        assert "GenerationResponse" in json.dumps(txt2img["responses"]["200"])


def test_auth_required_and_listen_rules(tiny_checkpoint, tmp_path, server_tools) -> None:  # type: ignore[no-untyped-def]
    make_config, start_server = server_tools
    from voidprompt.errors import VoidpromptError
    from voidprompt.server.cli import _parser, build_config

    with pytest.raises(VoidpromptError, match="--api-auth"):
        build_config(_parser().parse_args(["--listen", "--no-miniature"]))
    assert build_config(_parser().parse_args(["--listen", "--insecure", "--no-miniature"])).host == "0.0.0.0"  # type: ignore[attr-defined]

    config = make_config(
        tmp_path,
        tiny_checkpoint,
        credentials={"alice": "s3cret", "bob": "pw:with:colons"},
        cors_allow_origins=["http://ok.example"],
    )
    for running in start_server(config):
        url = running.url
        assert httpx.get(f"{url}/sdapi/v1/samplers").status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("alice", "wrong")).status_code == 401
        assert httpx.get(f"{url}/", auth=("mallory", "s3cret")).status_code == 401
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("alice", "s3cret")).status_code == 200
        assert httpx.get(f"{url}/sdapi/v1/samplers", auth=("bob", "pw:with:colons")).status_code == 200
        r = httpx.get(
            f"{url}/sdapi/v1/samplers", auth=("alice", "s3cret"), headers={"Origin": "http://ok.example"}
        )
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(
            f"{url}/sdapi/v1/samplers", auth=("alice", "s3cret"), headers={"Origin": "http://evil.example"}
        )
        assert "access-control-allow-origin" not in r.headers
        webuiapi = pytest.importorskip("webuiapi")
        api = webuiapi.WebUIApi(host="127.0.0.1", port=running.port, username="alice", password="s3cret")
        assert api.get_sd_models()[0]["model_name"] == "tiny"

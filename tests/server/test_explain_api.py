"""Explanations over HTTP: voidprompt's own generation routes with ``explain``, the description and
pictures of a generation's explanation, a study image's explanation file, and A1111's routes left
as they were."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from voidprompt.explain.store import explanation_path, load_explanation, save_explanation
from voidprompt.server.checkpoints import NotFoundError
from voidprompt.server.explanations import ExplanationCache

PROMPT = "a red ball, (blue cube:1.2)"
NEGATIVE = "lowres, (blurry:1.2)"
BODY = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "seed": 4242,
    "steps": 3,
    "width": 64,
    "height": 64,
    "batch_size": 2,
    "sampler_name": "Euler a",
    "cfg_scale": 7.0,
}
# The tiny checkpoint's VAE halves each side: 64 px pictures have 32-cell latents.
LATENT = 32


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def brightest_cell(png: bytes) -> tuple[int, int]:
    """Where a colorized map is brightest: the colour ramp rises in every channel's sum."""
    pixels = np.asarray(decode(png).convert("RGB"), dtype=np.int64).sum(axis=2)
    y, x = np.unravel_index(int(pixels.argmax()), pixels.shape)
    return int(y), int(x)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def explained(http: httpx.Client) -> dict[str, object]:
    r = http.post("/voidprompt/v1/txt2img", json={**BODY, "explain": {"preview_every": 1}})
    assert r.status_code == 200, r.text
    data: dict[str, object] = r.json()
    return data


def test_generation_route_returns_one_explanation_per_image_and_the_same_pictures(
    http: httpx.Client, explained: dict[str, object]
) -> None:
    info = json.loads(str(explained["info"]))
    refs = explained["explanations"]
    assert isinstance(refs, list) and len(refs) == 2
    assert [ref["image"] for ref in refs] == [0, 1]
    assert [ref["seed"] for ref in refs] == info["all_seeds"] == [4242, 4243]
    assert len({ref["id"] for ref in refs}) == 2
    assert all(ref["url"] == f"/voidprompt/v1/explanations/{ref['id']}" for ref in refs)
    # The capture changes no pixel: A1111's route, same body, same pictures.
    plain = http.post("/sdapi/v1/txt2img", json=BODY).json()
    assert len(plain["images"]) == 2
    for ours, theirs in zip(explained["images"], plain["images"], strict=True):  # type: ignore[call-overload]
        a = np.asarray(decode(base64.b64decode(ours)))
        b = np.asarray(decode(base64.b64decode(theirs)))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b)


def test_description_has_the_prompt_tags_with_weights_and_finite_measures(
    http: httpx.Client, explained: dict[str, object]
) -> None:
    ref = explained["explanations"][0]  # type: ignore[index]
    d = http.get(ref["url"]).json()
    assert [t["key"] for t in d["tags"]] == [
        "positive:a red ball",
        "positive:blue cube",
        "negative:lowres",
        "negative:blurry",
    ]
    assert [t["weight"] for t in d["tags"]] == [1.0, 1.2, 1.0, 1.2]
    assert d["latent_size"] == [LATENT, LATENT] and d["map_size"] == [LATENT, LATENT]
    assert d["windows"] == ["all", "early", "middle", "late"]
    assert len(d["calls"]) == 3 and all(c["uncond"] for c in d["calls"])
    assert d["window_calls"]["all"] == [0, 1, 2]
    for tag in d["tags"]:
        for window in d["windows"]:
            values = tag["measures"][window]
            assert all(math.isfinite(values[k]) for k in ("mass_share", "peak_y", "peak_x", "spread"))
            assert 0 < values["mass_share"] < 1 and 0 <= values["spread"] <= 1
    # A branch's tags share its attention between them.
    for branch in ("positive", "negative"):
        shares = [t["measures"]["all"]["mass_share"] for t in d["tags"] if t["branch"] == branch]
        assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    # Every call ran both branches: each window's guidance difference is the mean of its calls'.
    per_call = [c["guidance_difference"] for c in d["calls"]]
    assert d["guidance_differences"]["all"] == pytest.approx(sum(per_call) / 3, rel=1e-6)
    assert d["guidance_differences"]["early"] == pytest.approx(per_call[0], rel=1e-6)
    assert [p["call"] for p in d["previews"]] == [0, 1, 2]
    assert set(d["previews"][0]["subjects"]) == {"prompt", "negative", "combined", "difference"}


def test_heatmaps_and_previews_decode_to_the_right_sizes(
    http: httpx.Client, explained: dict[str, object]
) -> None:
    ref = explained["explanations"][1]  # type: ignore[index]
    d = http.get(ref["url"]).json()
    for tag in d["tags"]:
        over = http.get(d["heatmap_url"], params={"tag": tag["key"], "window": "early"})
        assert over.status_code == 200 and over.headers["content-type"] == "image/png"
        assert decode(over.content).size == (64, 64)
        alone = http.get(d["heatmap_url"], params={"tag": tag["key"], "window": "early", "overlay": "false"})
        assert decode(alone.content).size == (LATENT, LATENT)
        # The colour map's brightest cell is the measures' peak (two owners, one map).
        y, x = brightest_cell(alone.content)
        peak = tag["measures"]["early"]
        assert ((y + 0.5) / LATENT, (x + 0.5) / LATENT) == (peak["peak_y"], peak["peak_x"])
    for preview in d["previews"]:
        for subject, url in preview["subjects"].items():
            image = decode(http.get(url).content)
            assert image.size == (LATENT, LATENT), subject
            assert image.mode == "RGB"


def test_bad_ids_tags_windows_and_previews_are_4xx_naming_the_choices(
    http: httpx.Client, explained: dict[str, object]
) -> None:
    url = explained["explanations"][0]["url"]  # type: ignore[index]
    r = http.get("/voidprompt/v1/explanations/0123456789abcdef")
    assert r.status_code == 404 and "most recent" in r.json()["detail"]
    r = http.get(f"{url}/heatmap.png", params={"tag": "positive:dragon"})
    assert r.status_code == 404 and "positive:a red ball" in r.json()["detail"]
    r = http.get(f"{url}/heatmap.png", params={"tag": "negative:lowres", "window": "hires"})
    assert r.status_code == 404 and "all, early, middle, late" in r.json()["detail"]
    r = http.get(f"{url}/heatmap.png")
    assert r.status_code == 400 and "tag=" in r.json()["detail"]
    r = http.get(f"{url}/heatmap.png", params={"token": 0})
    assert r.status_code == 404 and "per_token" in r.json()["detail"]
    r = http.get(f"{url}/previews/3/prompt.png")
    assert r.status_code == 404 and "0 to 2" in r.json()["detail"]
    r = http.get(f"{url}/previews/0/latent.png")
    assert r.status_code == 404 and "combined" in r.json()["detail"]
    r = http.get(f"{url}/vae/0.png")
    assert r.status_code == 404 and "none" in r.json()["detail"]
    for explain in ({"preview_every": -1}, {"vae_calls": [-1]}, {"vae_calls": list(range(9))}):
        r = http.post("/voidprompt/v1/txt2img", json={**BODY, "batch_size": 1, "explain": explain})
        assert r.status_code == 422, explain


def test_per_token_maps_and_vae_previews(http: httpx.Client) -> None:
    body = {**BODY, "batch_size": 1, "explain": {"per_token": True, "preview_every": 0, "vae_calls": [1]}}
    r = http.post("/voidprompt/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    d = http.get(r.json()["explanations"][0]["url"]).json()
    assert d["previews"] == []
    keys = [t["key"] for t in d["tags"]]
    # CLIP's BPE pieces, each with its tag (-1: the comma, which belongs to none).
    negative = [(t["text"], t["tag"]) for t in d["tokens"] if t["branch"] == "negative"]
    lowres, blurry = keys.index("negative:lowres"), keys.index("negative:blurry")
    assert negative == [("low", lowres), ("res", lowres), (",", -1), ("blurry", blurry)]
    token = next(t for t in d["tokens"] if t["text"] == "blurry")
    assert token["weight"] == 1.2 and d["tags"][token["tag"]]["key"] == "negative:blurry"
    png = http.get(d["heatmap_url"], params={"token": token["index"], "overlay": "false"})
    assert decode(png.content).size == (LATENT, LATENT)
    assert list(d["vae_previews"]) == ["1"]
    assert decode(http.get(d["vae_previews"]["1"]).content).size == (64, 64)


def test_img2img_and_hires_fix_explained_with_the_same_pictures(http: httpx.Client) -> None:
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    body = {
        **BODY,
        "batch_size": 1,
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "denoising_strength": 0.6,
    }
    ours = http.post("/voidprompt/v1/img2img", json={**body, "explain": {}}).json()
    theirs = http.post("/sdapi/v1/img2img", json=body).json()
    assert ours["images"] == theirs["images"]
    d = http.get(ours["explanations"][0]["url"]).json()
    # A1111's img2img: t_enc = int(0.6 * 3) = 1, sigmas[steps - t_enc - 1:], so t_enc + 1 calls.
    assert len(d["calls"]) == int(0.6 * 3) + 1
    assert [t["key"] for t in d["tags"]][:2] == ["positive:a red ball", "positive:blue cube"]

    hires = {
        **BODY,
        "batch_size": 1,
        "steps": 2,
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 1,
        "denoising_strength": 0.5,
    }
    ours = http.post("/voidprompt/v1/txt2img", json={**hires, "explain": {}}).json()
    theirs = http.post("/sdapi/v1/txt2img", json=hires).json()
    assert ours["images"] == theirs["images"]
    d = http.get(ours["explanations"][0]["url"]).json()
    assert d["windows"] == ["all", "early", "middle", "late", "hires"]
    # 96 px pictures: the maps at the hires pass's latent size.
    assert d["latent_size"] == [48, 48]
    assert [c["pass_name"] for c in d["calls"]] == ["first", "first", "hires"]
    png = http.get(d["heatmap_url"], params={"tag": "negative:lowres", "window": "hires"})
    assert png.status_code == 200 and decode(png.content).size == (96, 96)


def test_explain_off_gives_no_explanations(http: httpx.Client) -> None:
    r = http.post("/voidprompt/v1/txt2img", json={**BODY, "batch_size": 1, "steps": 1})
    assert r.status_code == 200 and r.json()["explanations"] == []


def test_a1111_routes_see_nothing_new(http: httpx.Client) -> None:
    r = http.post("/sdapi/v1/txt2img", json={**BODY, "batch_size": 1, "steps": 1, "explain": {}})
    assert r.status_code == 200
    data = r.json()
    assert set(data) == {"images", "parameters", "info"}
    assert "explain" not in data["parameters"]
    schema = http.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for route, model in (("txt2img", "Txt2ImgRequest"), ("img2img", "Img2ImgRequest")):
        ref = schema["paths"][f"/sdapi/v1/{route}"]["post"]["requestBody"]["content"]["application/json"]
        assert ref["schema"]["$ref"].endswith(f"/{model}")
        assert "explain" not in components[model]["properties"]
        answer = schema["paths"][f"/sdapi/v1/{route}"]["post"]["responses"]["200"]["content"]
        assert answer["application/json"]["schema"]["$ref"].endswith("/GenerationResponse")
    assert set(components["GenerationResponse"]["properties"]) == {"images", "parameters", "info"}


def test_saved_images_get_their_explanation_file_beside_them(
    server, http: httpx.Client, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    config = server.app.state.voidprompt.config
    config.outdir = tmp_path
    try:
        body = {**BODY, "batch_size": 1, "save_images": True, "explain": {"preview_every": 2}}
        r = http.post("/voidprompt/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        plain = http.post("/sdapi/v1/txt2img", json={**body, "seed": 7})
        assert plain.status_code == 200
    finally:
        config.outdir = None
    pictures = sorted((tmp_path / "txt2img-images").glob("*/*.png"))
    assert [p.name.split("-", 1)[1] for p in pictures] == ["4242.png", "7.png"]
    saved = load_explanation(explanation_path(pictures[0]))
    assert [t.key for t in saved.tags] == [
        "positive:a red ball",
        "positive:blue cube",
        "negative:lowres",
        "negative:blurry",
    ]
    # Every 2nd call and the last of 3.
    assert [p.call for p in saved.previews] == [0, 2]
    # A1111's route asked for no capture: its picture has no explanation file.
    assert not explanation_path(pictures[1]).exists()
    described = http.get(r.json()["explanations"][0]["url"]).json()
    assert [t["key"] for t in described["tags"]] == [t.key for t in saved.tags]


def test_the_cache_keeps_the_most_recent(synthetic) -> None:  # type: ignore[no-untyped-def]
    picture = Image.new("RGB", (8, 8))
    cache = ExplanationCache(2)
    first, second = (cache.add(synthetic.build(4, 4), picture) for _ in range(2))
    cache.get(first)  # read: now the most recent
    third = cache.add(synthetic.build(4, 4), picture)
    assert len(cache) == 2
    cache.get(first), cache.get(third)
    with pytest.raises(NotFoundError, match="the 2 most recent"):
        cache.get(second)
    nothing = ExplanationCache(0)
    with pytest.raises(NotFoundError):
        nothing.get(nothing.add(synthetic.build(4, 4), picture))


# ------------------------------------------------------------------------------------ study images


@pytest.fixture()
def study_files(study_server, synthetic) -> Iterator[tuple[str, list[int], list[Path]]]:  # type: ignore[no-untyped-def]
    """The smoke study's first three images: an explanation file beside the first, a broken one
    beside the second, none beside the third (each put back as it was afterwards)."""
    registry = study_server.app.state.voidprompt.studies
    entry = registry.get("smoke")
    with httpx.Client(base_url=study_server.url, timeout=60) as client:
        ids = [im["id"] for im in client.get("/voidprompt/v1/studies/smoke/images").json()["images"][:3]]
    paths = [registry.explanation_file(entry, i) for i in ids]
    before = {p: p.read_bytes() for _image, p in paths if p.exists()}
    save_explanation(paths[0][1], synthetic.build())
    paths[1][1].write_bytes(b"PK\x03\x04 not really a zip")
    paths[2][1].unlink(missing_ok=True)
    try:
        yield study_server.url, ids, [image for image, _p in paths]
    finally:
        for _image, p in paths:
            p.unlink(missing_ok=True)
        for p, data in before.items():
            p.write_bytes(data)


def test_a_study_images_explanation_is_served(study_files, synthetic) -> None:  # type: ignore[no-untyped-def]
    url, ids, images = study_files
    # Its maps are within the stored size (32 cells): kept cell for cell.
    side = synthetic.side
    with httpx.Client(base_url=url, timeout=60) as http:
        detail = http.get(f"/voidprompt/v1/studies/smoke/images/{ids[0]}").json()
        base = f"/voidprompt/v1/studies/smoke/images/{ids[0]}/explanation"
        assert detail["explanation_url"] == base
        d = http.get(base).json()
        assert [(t["key"], t["weight"]) for t in d["tags"]] == [
            ("positive:red ball", 1.0),
            ("negative:lowres", 1.3),
        ]
        # Alone in its branch, a tag has all of the branch's attention; its peak is its bright cell.
        positive = d["tags"][0]["measures"]["all"]
        assert positive["mass_share"] == 1.0
        assert (positive["peak_y"], positive["peak_x"]) == tuple(
            (c + 0.5) / side for c in synthetic.peak_positive
        )
        # Only call 0 ran the negative prompt: both windows' guidance difference is its 0.5.
        assert d["guidance_differences"] == {"all": 0.5, "early": 0.5}
        assert d["calls"][1]["guidance_difference"] is None and d["calls"][1]["uncond"] is False
        assert set(d["previews"][1]["subjects"]) == {"prompt", "combined"}

        size = Image.open(images[0]).size
        over = http.get(d["heatmap_url"], params={"tag": "positive:red ball"})
        assert over.status_code == 200 and decode(over.content).size == size
        alone = http.get(d["heatmap_url"], params={"tag": "negative:lowres", "overlay": "false"})
        assert decode(alone.content).size == (side, side)
        assert brightest_cell(alone.content) == synthetic.peak_negative
        prompt = np.asarray(decode(http.get(d["previews"][0]["subjects"]["prompt"]).content))
        assert prompt.shape == (side, side, 3) and (prompt == [200, 0, 0]).all()
        difference = http.get(d["previews"][0]["subjects"]["difference"]).content
        assert brightest_cell(difference) == (side - 1, side - 1)
        r = http.get(f"{base}/previews/1/negative.png")
        assert r.status_code == 404 and "skipped" in r.json()["detail"]


def test_study_explanation_errors_are_one_line_4xx(study_files) -> None:  # type: ignore[no-untyped-def]
    url, ids, _images = study_files
    with httpx.Client(base_url=url, timeout=60) as http:
        broken = http.get(f"/voidprompt/v1/studies/smoke/images/{ids[1]}/explanation")
        assert broken.status_code == 422
        detail = broken.json()["detail"]
        assert "not a readable explanation file" in detail and "\n" not in detail
        assert (
            http.get(
                f"/voidprompt/v1/studies/smoke/images/{ids[1]}/explanation/heatmap.png", params={"tag": "x"}
            ).status_code
            == 422
        )
        missing = http.get(f"/voidprompt/v1/studies/smoke/images/{ids[2]}/explanation")
        assert missing.status_code == 404 and "no explanation file" in missing.json()["detail"]
        assert http.get(f"/voidprompt/v1/studies/smoke/images/{ids[2]}").json()["explanation_url"] is None
        assert http.get("/voidprompt/v1/studies/smoke/images/99999/explanation").status_code == 404
        assert http.get("/voidprompt/v1/studies/smoke/images/0/explanation").status_code == 422
        assert http.get("/voidprompt/v1/studies/nope/images/1/explanation").status_code == 404
        for bad in ("..%2F..%2Fetc", "%2E%2E", "smoke%2F..%2F.."):
            r = http.get(f"/voidprompt/v1/studies/{bad}/images/{ids[0]}/explanation")
            assert r.status_code == 404, bad


def test_serve_sets_the_number_kept_and_refuses_a_negative_one() -> None:
    from voidprompt.errors import VoidpromptError
    from voidprompt.server.cli import _parser, build_config

    assert build_config(_parser().parse_args(["--no-miniature"])).explain_cache == 32  # type: ignore[attr-defined]
    config = build_config(_parser().parse_args(["--no-miniature", "--explain-cache", "3"]))
    assert config.explain_cache == 3  # type: ignore[attr-defined]
    with pytest.raises(VoidpromptError, match="--explain-cache -1: give 0"):
        build_config(_parser().parse_args(["--no-miniature", "--explain-cache", "-1"]))

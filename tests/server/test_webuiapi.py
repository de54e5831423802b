"""The `webuiapi` client from PyPI, unchanged, against a real voidprompt server (tiny checkpoint)."""

from __future__ import annotations

import threading
import time

import pytest
from PIL import Image

from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters

webuiapi = pytest.importorskip("webuiapi")


@pytest.fixture()
def api(server):  # type: ignore[no-untyped-def]
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)


def _png_infotext(image: Image.Image) -> str:
    text, _items = read_infotext(image)
    assert text is not None
    return text


def test_txt2img_negative_prompt_seed_sampler_batch(api) -> None:  # type: ignore[no-untyped-def]
    result = api.txt2img(
        prompt="a red circle",
        negative_prompt="(blurry:1.2), text",
        seed=1234,
        sampler_name="Euler a",
        steps=2,
        width=64,
        height=64,
        batch_size=2,
        cfg_scale=5,
    )
    assert len(result.images) == 2
    assert all(image.size == (64, 64) for image in result.images)
    info = result.info
    assert info["all_seeds"] == [1234, 1235]
    assert info["seed"] == 1234
    assert info["sampler_name"] == "Euler a"
    assert info["negative_prompt"] == "(blurry:1.2), text"
    assert info["sd_model_name"] == "tiny"
    assert len(info["sd_model_hash"]) == 10
    for image, seed, infotext in zip(result.images, (1234, 1235), info["infotexts"], strict=True):
        text = _png_infotext(image)
        assert text == infotext
        params = parse_generation_parameters(text)
        assert params["Prompt"] == "a red circle"
        assert params["Negative prompt"] == "(blurry:1.2), text"
        assert params["Seed"] == str(seed) or params["Seed"] == seed
        assert params["Sampler"] == "Euler a"
        assert str(params["Steps"]) == "2"
        assert str(params["CFG scale"]) == "5"
        assert params["Model hash"] == info["sd_model_hash"]
    # The echo carries the request as sent (webuiapi sends sampler_index too).
    assert result.parameters["prompt"] == "a red circle"
    assert result.parameters["batch_size"] == 2


def test_txt2img_same_seed_same_pixels(api) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(prompt="x", seed=77, steps=1, width=64, height=64, sampler_name="Euler")
    first = api.txt2img(**kwargs).image
    second = api.txt2img(**kwargs).image
    assert first.tobytes() == second.tobytes()


def test_img2img(api) -> None:  # type: ignore[no-untyped-def]
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    result = api.img2img(
        images=[source],
        prompt="blue",
        seed=5,
        steps=2,
        width=64,
        height=64,
        denoising_strength=0.5,
        sampler_name="Euler",
    )
    assert len(result.images) == 1
    assert result.image.size == (64, 64)
    params = parse_generation_parameters(_png_infotext(result.image))
    assert str(params["Denoising strength"]) == "0.5"
    assert str(params["Seed"]) == "5"
    assert result.info["all_seeds"] == [5]
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images


def test_img2img_inpaint_keeps_unmasked_pixels(api) -> None:  # type: ignore[no-untyped-def]
    source = Image.new("RGB", (64, 64), (10, 200, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half only
    result = api.img2img(
        images=[source],
        mask_image=mask,
        mask_blur=0,
        inpainting_fill=1,
        inpaint_full_res=False,
        prompt="",
        seed=9,
        steps=2,
        width=64,
        height=64,
        denoising_strength=0.9,
        sampler_name="Euler",
    )
    out = result.image.convert("RGB")
    # Far from the mask edge the original pixels come back exactly (A1111's final composite).
    assert out.getpixel((60, 10)) == (10, 200, 30)
    assert out.getpixel((60, 50)) == (10, 200, 30)
    params = parse_generation_parameters(_png_infotext(result.image))
    assert "Mask blur" not in params  # A1111 writes it only when the blur is above 0


def test_png_info_round_trip(api) -> None:  # type: ignore[no-untyped-def]
    generated = api.txt2img(prompt="a cat", negative_prompt="dog", seed=42, steps=1, width=64, height=64)
    info = api.png_info(generated.image)
    text = info.info if isinstance(info.info, str) else info.json["info"]
    assert text == generated.info["infotexts"][0]
    assert info.json["parameters"]["Prompt"] == "a cat"
    assert info.json["parameters"]["Negative prompt"] == "dog"
    assert str(info.json["parameters"]["Seed"]) == "42"


def test_samplers_and_models(api, tiny_checkpoint) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.models.hashes import sha256_file
    from voidprompt.sampling.registry import sampler_labels

    samplers = api.get_samplers()
    assert [s["name"] for s in samplers] == sampler_labels()
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "k_euler_a" in euler_a["aliases"]
    models = api.get_sd_models()
    sha = sha256_file(tiny_checkpoint)
    assert models[0]["title"] == f"tiny.safetensors [{sha[:10]}]"
    assert models[0]["hash"] == sha[:10]
    assert models[0]["sha256"] == sha
    assert models[0]["model_name"] == "tiny"
    assert api.util_get_current_model() == models[0]["title"]
    schedulers = api.get_schedulers()
    assert schedulers[0]["name"] == "automatic"


def test_options_get_set_and_effect(api) -> None:  # type: ignore[no-untyped-def]
    options = api.get_options()
    assert options["CLIP_stop_at_last_layers"] == 1
    api.set_options({"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337})
    try:
        options = api.get_options()
        assert options["CLIP_stop_at_last_layers"] == 2
        assert options["eta_noise_seed_delta"] == 31337
        result = api.txt2img(prompt="x", seed=3, steps=1, width=64, height=64, sampler_name="Euler a")
        params = parse_generation_parameters(result.info["infotexts"][0])
        assert str(params["Clip skip"]) == "2"
        assert str(params["ENSD"]) == "31337"  # Euler a draws eta noise, so ENSD is written
        assert result.info["clip_skip"] == 2
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0})
    # override_settings: one request only, restored afterwards.
    result = api.txt2img(
        prompt="x", seed=3, steps=1, width=64, height=64, override_settings={"CLIP_stop_at_last_layers": 2}
    )
    assert str(parse_generation_parameters(result.info["infotexts"][0])["Clip skip"]) == "2"
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1


def test_interrupt_stops_a_long_request(api, server) -> None:  # type: ignore[no-untyped-def]
    holder: dict[str, object] = {}

    def run() -> None:
        holder["result"] = api.txt2img(
            prompt="x", seed=10, steps=20, width=64, height=64, n_iter=20, sampler_name="Euler"
        )

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if progress["state"]["job"] == "txt2img" and progress["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 20
    assert 0 < progress["progress"] <= 1
    assert api.interrupt() == {}
    thread.join(120)
    result = holder["result"]
    # Interrupted early: fewer than the 20 iterations came back, each with its own correct seed.
    assert len(result.images) < 20
    assert result.info["all_seeds"] == list(range(10, 10 + len(result.images)))
    assert result.info["interrupted"] is True
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)

"""The web UI's A1111 controls in headless Chromium: hires fix, styles, the extra-networks panel,
Save / Zip, PNG Info, checkpoint and VAE switching, the inpainting mask canvas, Extras, progress.

One server (the tiny checkpoint, a second one, a VAE, a LoRA, an embedding, a styles file) and one
browser are shared by the module. The first test is the quick suite's end-to-end scenario; the
others are slow. Screenshots go to $VOIDPROMPT_TEST_ARTIFACTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import io
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from voidprompt.testing.browser import chromium_available, headless_chromium

pytestmark = pytest.mark.skipif(
    not chromium_available(), reason="chromium / chromium-driver / selenium not installed"
)

STYLES_CSV = 'name,prompt,negative_prompt\nwatercolor,"{prompt}, watercolor",blurry\n'
TINY_WIDTH = 32  # the tiny checkpoint's text encoder width


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, tiny_checkpoint, server_tools):  # type: ignore[no-untyped-def]
    import torch
    from safetensors.torch import save_file

    from voidprompt.models.networks.extract import extract_lora
    from voidprompt.testing.fake_checkpoints import tiny_vae_state_dict, write_tiny_checkpoint

    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("ui-server")
    (root / "studies").mkdir()
    (root / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    config = make_config(
        root, tiny_checkpoint, styles_files=[root / "styles.csv"], upscaler_dir=root / "models"
    )
    other = write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny-b.safetensors", seed=1)
    (root / "models" / "VAE").mkdir(parents=True)
    save_file(tiny_vae_state_dict(seed=5), str(root / "models" / "VAE" / "other.vae.safetensors"))
    (root / "models" / "Lora").mkdir(parents=True)
    extract_lora(tiny_checkpoint, other, root / "models" / "Lora" / "tinylora.safetensors", rank=2)
    (root / "embeddings").mkdir()
    gen = torch.Generator().manual_seed(0)
    save_file(
        {"emb_params": torch.randn(2, TINY_WIDTH, generator=gen)},
        str(root / "embeddings" / "vpemb.safetensors"),
    )
    for running in start_server(config):
        running.root = root
        yield running


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory, downloads) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    with headless_chromium(tmp_path_factory.mktemp("profile")) as driver:
        driver.execute_cdp_cmd(
            "Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("VOIDPROMPT_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("browser-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wait_for(condition, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting in the browser")
        time.sleep(0.05)


def css(b, selector: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return b.find_element(By.CSS_SELECTOR, selector)


def csss(b, selector: str):  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    return b.find_elements(By.CSS_SELECTOR, selector)


def fill(b, **fields: object) -> None:  # type: ignore[no-untyped-def]
    for field, value in fields.items():
        box = css(b, f"#{field}")
        box.clear()
        box.send_keys(str(value))


def open_page(b, server) -> None:  # type: ignore[no-untyped-def]
    b.get(server.url + "/")
    wait_for(lambda: len(csss(b, "#sampler option")) > 5 and csss(b, "#networks-loras .card"))


def generate(b) -> tuple[str, Image.Image]:  # type: ignore[no-untyped-def]
    """Click Generate; the first result's infotext and picture, once a new one is shown."""
    b.execute_script("document.querySelector('#gallery').replaceChildren()")
    css(b, "#generate").click()
    info = wait_for(lambda: csss(b, "#gallery .infotext") or css(b, "#gen-error").text, 120)
    assert not isinstance(info, str), info
    src = css(b, "#gallery img").get_attribute("src")
    return info[0].text, Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def api_image(server, route: str, body: dict[str, Any]) -> Image.Image:  # type: ignore[no-untyped-def]
    answer = httpx.post(server.url + route, json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))


def test_hires_style_lora_zip_and_png_info_round_trip(browser, ui_server, downloads, artifacts) -> None:  # type: ignore[no-untyped-def]
    """From the txt2img form: a style, a LoRA tag inserted at the prompt's cursor, an embedding in
    the negative prompt, hires fix (Latent (nearest), 2x, 1 hires step). The picture equals the API's
    for the same request; Zip downloads it; PNG Info reads it back and "Send to txt2img" restores
    the form (the style taken back out of the prompt)."""
    from selenium.webdriver.support.ui import Select

    b = browser
    open_page(b, ui_server)
    assert [o.text for o in csss(b, "#styles option")] == ["watercolor"]
    assert [c.get_attribute("textContent") for c in csss(b, "#networks-loras .card")] == ["tinylora"]
    # A1111's order: the prompt above the negative prompt, latent modes first in the hires list.
    assert b.execute_script(
        "const q = (s) => document.querySelector(s); return q('#prompt')"
        ".compareDocumentPosition(q('#negative_prompt')) & Node.DOCUMENT_POSITION_FOLLOWING"
    )
    upscalers = [o.get_attribute("value") for o in csss(b, "#hr_upscaler option")]
    assert upscalers[:2] == ["Latent", "Latent (antialiased)"] and "Lanczos" in upscalers

    css(b, "#prompt").send_keys("a cat, outdoors")
    b.execute_script("const p = document.querySelector('#prompt'); p.focus(); p.setSelectionRange(5, 5);")
    css(b, "#networks-toggle").click()
    css(b, "#networks-loras .card").click()
    assert css(b, "#prompt").get_attribute("value") == "a cat <lora:tinylora:1>, outdoors"
    css(b, "#negative_prompt").send_keys("lowres")
    css(b, "#networks-embeddings .card").click()
    assert css(b, "#negative_prompt").get_attribute("value") == "lowres vpemb"
    Select(css(b, "#styles")).select_by_value("watercolor")

    fill(b, width=64, height=64, steps=1, seed=1234)
    css(b, "#enable_hr").click()
    Select(css(b, "#hr_upscaler")).select_by_value("Latent (nearest)")
    fill(b, hr_second_pass_steps=1)
    assert css(b, "#hr-info").text == "from 64x64 to 128x128"
    infotext, picture = generate(b)
    lines = infotext.split("\n")
    assert lines[0] == "a cat <lora:tinylora:1>, outdoors, watercolor"
    assert lines[1] == "Negative prompt: lowres vpemb, blurry"
    for key in ("Seed: 1234", "Size: 64x64", "Denoising strength: 0.7", "Hires upscale: 2", "Hires steps: 1",
                "Hires upscaler: Latent (nearest)", 'Lora hashes: "tinylora:'):  # fmt: skip
        assert key in lines[2], key
    assert picture.size == (128, 128)
    b.save_screenshot(str(artifacts / "a1111-01-hires-style-lora.png"))

    # The same request sent by hand gives the same picture: the form sends what it shows.
    body = {
        "prompt": "a cat <lora:tinylora:1>, outdoors", "negative_prompt": "lowres vpemb",
        "styles": ["watercolor"],
        "seed": 1234, "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7,
        "enable_hr": True, "hr_upscaler": "Latent (nearest)", "hr_scale": 2, "hr_second_pass_steps": 1,
        "denoising_strength": 0.7,
    }  # fmt: skip
    expected = api_image(ui_server, "/sdapi/v1/txt2img", body)
    assert np.array_equal(np.asarray(picture), np.asarray(expected))

    # Zip: a store-only archive written by the page, read by Python's zipfile (CRCs checked).
    css(b, "#zip-all").click()
    archive = wait_for(lambda: (downloads / "images.zip").is_file() and downloads / "images.zip", 30)
    with zipfile.ZipFile(archive) as z:
        assert z.testzip() is None
        assert z.namelist() == ["00000-1234.png"]
        png = z.read("00000-1234.png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(picture))
    saved = downloads / "from-zip.png"
    saved.write_bytes(png)

    # PNG Info: the parameters of the zipped file, then the form filled back from them.
    fill(b, prompt="something else", seed=-1, width=512, height=512)
    css(b, "#enable_hr").click()
    Select(css(b, "#styles")).deselect_all()
    css(b, "#tab-pnginfo").click()
    css(b, "#pnginfo-file").send_keys(str(saved))
    shown = wait_for(lambda: css(b, "#pnginfo-text").text)
    assert shown.split("\n")[0] == "a cat <lora:tinylora:1>, outdoors, watercolor"
    assert "Hires upscaler: Latent (nearest)" in shown
    b.save_screenshot(str(artifacts / "a1111-02-png-info.png"))
    css(b, "#pnginfo-to-txt2img").click()
    assert not css(b, "#view-generate").get_attribute("hidden")
    value = lambda sel: css(b, sel).get_attribute("value")  # noqa: E731
    assert value("#prompt") == "a cat <lora:tinylora:1>, outdoors"
    assert value("#negative_prompt") == "lowres vpemb"
    assert [o.get_attribute("value") for o in Select(css(b, "#styles")).all_selected_options] == [
        "watercolor"
    ]
    assert (value("#seed"), value("#width"), value("#height"), value("#steps")) == ("1234", "64", "64", "1")
    assert css(b, "#enable_hr").is_selected()
    assert (value("#hr_upscaler"), value("#hr_scale"), value("#hr_second_pass_steps")) == (
        "Latent (nearest)",
        "2",
        "1",
    )
    assert value("#hr_denoising_strength") == "0.7"
    again_text, again = generate(b)
    assert again_text == infotext and np.array_equal(np.asarray(again), np.asarray(picture))

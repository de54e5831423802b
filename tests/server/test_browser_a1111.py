"""The web UI's A1111 controls in headless Chromium: hires fix, styles, the extra-networks panel,
Save / Zip, PNG Info, checkpoint and VAE switching, the inpainting mask canvas, Extras, progress.

One server (the tiny checkpoint, a second one, a VAE, a LoRA, an embedding, a styles file) and one
browser are shared by the module. The first test is the quick suite's end-to-end scenario; the
others are slow. Screenshots go to $VOIDPROMPT_TEST_ARTIFACTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import base64
import io
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from voidprompt.testing.browser import artifacts_dir, chromium_available, headless_chromium, wait_for

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
    from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("ui-server")
    (root / "studies").mkdir()
    (root / "styles.csv").write_text(STYLES_CSV, encoding="utf-8")
    config = make_config(
        root, tiny_checkpoint, styles_files=[root / "styles.csv"], upscaler_dir=root / "models"
    )
    other = write_tiny_checkpoint(root / "models" / "Stable-diffusion" / "tiny-b.safetensors", seed=1)
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
    return artifacts_dir(tmp_path_factory)




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

    fill(b, width=32, height=32, steps=1, seed=1234)  # 32 px: a tenth of 64's time
    css(b, "#enable_hr").click()
    Select(css(b, "#hr_upscaler")).select_by_value("Latent (nearest)")
    fill(b, hr_second_pass_steps=1)
    assert css(b, "#hr-info").text == "from 32x32 to 64x64"
    infotext, picture = generate(b)
    lines = infotext.split("\n")
    assert lines[0] == "a cat <lora:tinylora:1>, outdoors, watercolor"
    assert lines[1] == "Negative prompt: lowres vpemb, blurry"
    for key in ("Seed: 1234", "Size: 32x32", "Denoising strength: 0.7", "Hires upscale: 2", "Hires steps: 1",
                "Hires upscaler: Latent (nearest)", 'Lora hashes: "tinylora:'):  # fmt: skip
        assert key in lines[2], key
    assert picture.size == (64, 64)
    b.save_screenshot(str(artifacts / "a1111-01-hires-style-lora.png"))
    # Every button, the script's included, says what it does in words (no emoji font needed).
    labels = b.execute_script("return [...document.querySelectorAll('button')].map(x => x.textContent)")
    assert "Send to img2img" in labels and "Zip" in labels
    # The progress label's times, in A1111's words: seconds, then mm:ss past a minute, hh:mm:ss past an hour.
    assert b.execute_script("return [etaText(3.7), etaText(65), etaText(3725)]") == [
        "3s",
        "01:05",
        "01:02:05",
    ]
    assert all(re.search(r"[A-Za-z]{2,}", t) and t.isascii() for t in labels), labels

    css(b, "#gallery .send-extras").click()
    assert not css(b, "#view-extras").get_attribute("hidden")
    assert css(b, "#extras-preview").get_attribute("src") == css(b, "#gallery img").get_attribute("src")
    css(b, "#tab-generate").click()

    # The same request sent by hand gives the same picture: the form sends what it shows.
    body = {
        "prompt": "a cat <lora:tinylora:1>, outdoors", "negative_prompt": "lowres vpemb",
        "styles": ["watercolor"],
        "seed": 1234, "steps": 1, "width": 32, "height": 32, "sampler_name": "Euler a", "cfg_scale": 7,
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
    assert (value("#seed"), value("#width"), value("#height"), value("#steps")) == ("1234", "32", "32", "1")
    assert css(b, "#enable_hr").is_selected()
    assert (value("#hr_upscaler"), value("#hr_scale"), value("#hr_second_pass_steps")) == (
        "Latent (nearest)",
        "2",
        "1",
    )
    assert value("#hr_denoising_strength") == "0.7"
    again_text, again = generate(b)
    assert again_text == infotext and np.array_equal(np.asarray(again), np.asarray(picture))


def record_progress(b) -> None:  # type: ignore[no-untyped-def]
    """Keep every text the progress label shows (polls are faster than a human reads them)."""
    b.execute_script(
        "const label = document.querySelector('#progress-text'); window.progressSeen = [];"
        "new MutationObserver(() => window.progressSeen.push(label.textContent))"
        ".observe(label, {childList: true, characterData: true, subtree: true});"
    )


@pytest.mark.slow  # a browser driving the web UI through a checkpoint and VAE switch
def test_switch_checkpoint_and_vae_with_progress(browser, ui_server, artifacts) -> None:  # type: ignore[no-untyped-def]
    """The checkpoint dropdown loads the other file (one resident at a time) and the VAE dropdown
    sets sd_vae; the next picture names both and equals the API's; progress reads "N% ETA: Ns"."""

    from safetensors.torch import save_file
    from selenium.webdriver.support.ui import Select

    from voidprompt.testing.fake_checkpoints import tiny_vae_state_dict

    # A VAE file written here (the quick test does not need it) and found by A1111's refresh route.
    (ui_server.root / "models" / "VAE").mkdir(parents=True, exist_ok=True)
    save_file(tiny_vae_state_dict(seed=5), str(ui_server.root / "models" / "VAE" / "other.vae.safetensors"))
    assert httpx.post(ui_server.url + "/sdapi/v1/refresh-vae", timeout=30).status_code == 200
    b = browser
    open_page(b, ui_server)
    titles = [o.get_attribute("value") for o in csss(b, "#model-select option")]
    other = next(t for t in titles if t.startswith("tiny-b.safetensors"))
    vaes = [o.get_attribute("value") for o in csss(b, "#vae-select option")]
    assert vaes == ["Automatic", "None", "other.vae.safetensors"]
    try:
        Select(css(b, "#model-select")).select_by_value(other)
        wait_for(lambda: css(b, "#model-name").text == other, 120)
        Select(css(b, "#vae-select")).select_by_value("other.vae.safetensors")
        options = wait_for(
            lambda: (
                (o := httpx.get(ui_server.url + "/sdapi/v1/options", timeout=30).json())["sd_vae"]
                == "other.vae.safetensors"
                and o
            )
        )
        assert options["sd_model_checkpoint"] == other
        assert css(b, "#gen-error").text == ""
        fill(b, width=64, height=64, steps=20, seed=99, n_iter=2)
        record_progress(b)
        infotext, picture = generate(b)
        assert "Model: tiny-b," in infotext and "VAE: other.vae.safetensors," in infotext
        b.save_screenshot(str(artifacts / "a1111-03-checkpoint-vae.png"))
        seen = b.execute_script("return window.progressSeen")
        shown = [s for s in seen if s]
        # A1111's words: "42% ETA: 3s" ("01:05" past a minute).
        assert shown and all(re.fullmatch(r"(\d{1,3}%)?( ?ETA: (\d+s|\d\d:\d\d))?", s) for s in shown), seen
        assert any(re.fullmatch(r"\d{1,3}% ETA: \d+s", s) for s in shown), seen
        assert any(0 < int(s.split("%")[0]) < 100 for s in shown if "%" in s), seen
        body = {"prompt": "", "seed": 99, "steps": 20, "width": 64, "height": 64, "sampler_name": "Euler a"}
        assert np.array_equal(
            np.asarray(picture), np.asarray(api_image(ui_server, "/sdapi/v1/txt2img", body))
        )
    finally:
        httpx.post(
            ui_server.url + "/sdapi/v1/options",
            json={"sd_model_checkpoint": "tiny", "sd_vae": "Automatic"},
            timeout=120,
        )
        fill(b, n_iter=1)


def pattern(side: int) -> Image.Image:
    """A picture with a different colour in every pixel: any change shows."""
    yy, xx = np.mgrid[0:side, 0:side]
    rgb = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


@pytest.mark.slow  # a browser driving the web UI: drawing a mask and inpainting
def test_draw_mask_and_inpaint(browser, ui_server, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Draw on the init picture, erase part of the stroke, inpaint: the mask sent is white exactly
    where the brush left paint, and the result keeps the original's pixels outside it (A1111's
    overlay, mask blur 0) and equals the API's answer for the same mask."""
    from selenium.webdriver.common.action_chains import ActionChains

    b = browser
    open_page(b, ui_server)
    init = pattern(64)
    init.save(tmp_path / "init.png")
    b.find_element("css selector", "input[name=mode][value=img2img]").click()
    assert css(b, "#hires-fields").get_attribute("hidden")  # hires fix is txt2img's
    css(b, "#init_image").send_keys(str(tmp_path / "init.png"))
    wait_for(lambda: b.execute_script("return document.querySelector('#mask-canvas').width") == 64)
    canvas = css(b, "#mask-canvas")
    shown = canvas.size["width"]
    assert shown == 256  # shown 4x: brush sizes are screen pixels
    b.execute_script(
        "const s = document.querySelector('#brush-size'); s.value = '16';s.dispatchEvent(new Event('input'));"
    )
    # A horizontal stroke across the top-left quarter (screen offsets from the canvas centre).
    (
        ActionChains(b)
        .move_to_element_with_offset(canvas, -100, -80)
        .click_and_hold()
        .move_by_offset(40, 0)
        .move_by_offset(40, 0)
        .release()
        .perform()
    )
    b.find_element("css selector", "input[name=mask-tool][value=erase]").click()
    ActionChains(b).move_to_element_with_offset(canvas, -100, -80).click().perform()
    mask_url = b.execute_script("return drawnMask()")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_url.split(",", 1)[1]))).convert("L"))
    assert mask.shape == (64, 64)
    # Screen (28 + x, 48 + y) of a 256 px canvas is picture (7 + x/4, 12 + y/4); the brush is 4 px.
    assert mask[12, 17] == 255 and mask[12, 26] == 255  # on the stroke
    assert mask[12, 7] == 0  # erased again
    assert mask[40, 40] == 0 and mask[2, 17] == 0  # never drawn
    fill(b, width=64, height=64, steps=1, seed=5, denoising_strength=1, mask_blur=0)
    infotext, picture = generate(b)
    assert "Denoising strength: 1.0," in infotext  # (A1111 writes Mask blur only when it blurs)
    out = np.asarray(picture.convert("RGB")).astype(int)
    original = np.asarray(init).astype(int)
    outside = mask == 0
    assert np.array_equal(out[outside], original[outside])
    assert (np.abs(out[mask == 255] - original[mask == 255]).sum(axis=-1) > 0).mean() > 0.5
    b.save_screenshot(str(artifacts / "a1111-04-inpaint.png"))
    init_url = "data:image/png;base64," + base64.b64encode((tmp_path / "init.png").read_bytes()).decode()
    body = {
        "init_images": [init_url],
        "mask": mask_url, "prompt": "", "seed": 5, "steps": 1, "width": 64, "height": 64,
        "sampler_name": "Euler a", "denoising_strength": 1, "mask_blur": 0, "inpainting_fill": 1,
        "inpaint_full_res": False,  # the API's default is A1111's "Only masked"; the form's "Whole picture"
    }  # fmt: skip
    assert np.array_equal(out, np.asarray(api_image(ui_server, "/sdapi/v1/img2img", body).convert("RGB")))
    b.find_element("css selector", "input[name=mode][value=txt2img]").click()


@pytest.mark.slow  # a browser driving the web UI's Extras tab
def test_extras_scale_by_and_scale_to(browser, ui_server, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Extras: Lanczos by 2 gives PIL's Lanczos picture at twice the size; "Scale to" with crop gives
    the exact size asked for."""
    from selenium.webdriver.support.ui import Select

    b = browser
    open_page(b, ui_server)
    source = pattern(32)
    source.save(tmp_path / "source.png")
    css(b, "#tab-extras").click()
    css(b, "#extras-image").send_keys(str(tmp_path / "source.png"))
    wait_for(lambda: css(b, "#extras-preview").get_attribute("src"))
    fill(b, upscaling_resize=2)
    Select(css(b, "#upscaler_1")).select_by_value("Lanczos")

    def run() -> Image.Image:
        b.execute_script("document.querySelector('#extras-result').replaceChildren()")
        css(b, "#extras-run").click()
        img = wait_for(lambda: csss(b, "#extras-result .extras-output") or css(b, "#extras-error").text, 60)
        assert not isinstance(img, str), img
        return Image.open(io.BytesIO(base64.b64decode(img[0].get_attribute("src").split(",", 1)[1])))

    doubled = run()
    assert doubled.size == (64, 64)
    expected = source.resize((64, 64), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(doubled.convert("RGB")), np.asarray(expected))
    b.save_screenshot(str(artifacts / "a1111-05-extras.png"))
    b.find_element("css selector", "input[name=extras-resize-mode][value='1']").click()
    fill(b, upscaling_resize_w=96, upscaling_resize_h=64)
    assert run().size == (96, 64)
    css(b, "#tab-generate").click()


@pytest.mark.slow  # a browser driving the web UI: PNG Info to img2img and the rest of the form
def test_png_info_to_img2img_and_the_other_fields(browser, ui_server, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A hypernetwork card inserts its tag; Tiling and "resize seed from" reach the request and the
    infotext; PNG Info's "Send to img2img" switches to img2img with the picture as init image and
    the parameters in the form."""
    b = browser
    (ui_server.root / "models" / "hypernetworks").mkdir(parents=True, exist_ok=True)
    (ui_server.root / "models" / "hypernetworks" / "vphyper.pt").write_bytes(b"listed by name only")
    open_page(b, ui_server)
    wait_for(lambda: csss(b, "#networks-hypernetworks .card"))
    css(b, "#networks-toggle").click()
    b.execute_script(
        "const p = document.querySelector('#prompt'); p.value = 'red'; p.focus(); p.setSelectionRange(3, 3);"
    )
    css(b, "#networks-hypernetworks .card").click()
    assert css(b, "#prompt").get_attribute("value") == "red <hypernet:vphyper:1>"
    fill(b, prompt="red", width=32, height=32, steps=1, seed=42)
    css(b, "#tiling").click()
    css(b, "#seed-extra").click()
    fill(b, seed_resize_from_w=48, seed_resize_from_h=40)
    sent = b.execute_script("return formBody()")
    assert (sent["tiling"], sent["seed_resize_from_w"], sent["seed_resize_from_h"]) == (True, 48, 40)
    infotext, picture = generate(b)
    assert "Tiling: True" in infotext and "Seed resize from: 48x40" in infotext
    path = tmp_path / "made.png"
    picture.save(path, pnginfo=_text_chunk(infotext))

    # PNG Info, then Send to img2img: the form from the parameters, the picture as init image.
    fill(b, prompt="", seed=-1, seed_resize_from_w=0, seed_resize_from_h=0)
    for box in ("#tiling", "#seed-extra"):
        css(b, box).click()
    css(b, "#tab-pnginfo").click()
    css(b, "#pnginfo-file").send_keys(str(path))
    wait_for(lambda: css(b, "#pnginfo-text").text.startswith("red\n"))
    css(b, "#pnginfo-to-img2img").click()
    assert css(b, "input[name=mode][value=img2img]").is_selected()
    assert not css(b, "#img2img-fields").get_attribute("hidden")
    wait_for(lambda: b.execute_script("return document.querySelector('#mask-canvas').width") == 32)
    value = lambda sel: css(b, sel).get_attribute("value")  # noqa: E731
    assert (value("#prompt"), value("#seed"), value("#seed_resize_from_w"), value("#seed_resize_from_h")) == (
        "red", "42", "48", "40"
    )  # fmt: skip
    assert css(b, "#tiling").is_selected() and css(b, "#seed-extra").is_selected()
    init = b.execute_script("return initImageB64")
    assert (
        init.startswith("data:image/png;base64,")
        and base64.b64decode(init.split(",", 1)[1]) == path.read_bytes()
    )
    b.save_screenshot(str(artifacts / "a1111-06-png-info-to-img2img.png"))
    b.find_element("css selector", "input[name=mode][value=txt2img]").click()
    fill(b, seed_resize_from_w=0, seed_resize_from_h=0)
    for box in ("#tiling", "#seed-extra"):
        css(b, box).click()


def _text_chunk(infotext: str):  # type: ignore[no-untyped-def]
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", infotext)
    return info

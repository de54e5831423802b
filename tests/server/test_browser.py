"""The web UI in headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).

Skips cleanly when selenium, /usr/bin/chromium or chromedriver are missing. Screenshots go to
$VOIDPROMPT_TEST_ARTIFACTS (default: a pytest temporary folder named browser-artifacts).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from voidprompt.lab.catalog import Catalog
from voidprompt.testing.browser import artifacts_dir, chromium_available, headless_chromium, wait_for

pytestmark = pytest.mark.skipif(
    not chromium_available(), reason="chromium / chromium-driver / selenium not installed"
)


@pytest.fixture()
def browser(tmp_path: Path):  # type: ignore[no-untyped-def]
    with headless_chromium(tmp_path / "profile") as driver:
        yield driver


@pytest.fixture()
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)




def loaded_images(driver, selector: str) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    """The images under ``selector`` that finished loading, with their natural sizes."""
    script = (
        "return [...document.querySelectorAll(arguments[0])].filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => ({alt: i.alt, src: i.src, width: i.naturalWidth, height: i.naturalHeight}));"
    )
    result: list[dict[str, object]] = driver.execute_script(script, selector)
    return result


@pytest.mark.slow  # a browser driving the web UI, generating on the shipped model
def test_generate_browse_and_label(browser, study_server, artifacts) -> None:  # type: ignore[no-untyped-def]
    """On the miniature model: generate an image, open a study (grid and the report's plots), label
    ten images with the keyboard, and find those labels in the catalog."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from voidprompt.demo.miniature import MINIATURE_FILENAME

    b = browser
    b.get(study_server.url + "/")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#sampler option")) > 5)
    assert b.find_element(By.CSS_SELECTOR, "#model-name").text.startswith(MINIATURE_FILENAME + " [")
    # The form starts at the model's native size, which the miniature's file records.
    assert b.find_element(By.CSS_SELECTOR, "#model-family").text == "SD1 - trained at 128x128"
    assert [b.find_element(By.CSS_SELECTOR, f).get_attribute("value") for f in ("#width", "#height")] == [
        "128"
    ] * 2
    # Generate on the miniature model.
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "6"), ("#seed", "4321")):
        box = b.find_element(By.CSS_SELECTOR, field)
        box.clear()
        box.send_keys(value)
    b.find_element(By.CSS_SELECTOR, "#negative_prompt").send_keys("lowres, (text:1.2)")
    wait_for(lambda: b.find_element(By.CSS_SELECTOR, "#neg-tokens").text not in ("0/75", "?"))
    b.find_element(By.CSS_SELECTOR, "#generate").click()
    infotext = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#gallery .infotext"), 120)[0].text
    assert "Negative prompt: lowres, (text:1.2)" in infotext
    assert "Seed: 4321" in infotext and "Size: 64x64" in infotext and "Steps: 6" in infotext
    assert f"Model: {MINIATURE_FILENAME.rsplit('.', 1)[0]}," in infotext
    shown = wait_for(lambda: loaded_images(b, "#gallery img"))
    assert (shown[0]["width"], shown[0]["height"]) == (64, 64)
    b.save_screenshot(str(artifacts / "01-generate.png"))
    b.find_element(By.CSS_SELECTOR, "#seed-random").click()
    b.find_element(By.CSS_SELECTOR, "#gallery .reuse-seed").click()
    assert b.find_element(By.CSS_SELECTOR, "#seed").get_attribute("value") == "4321"

    # Study browser: a grid along two axes.
    b.find_element(By.CSS_SELECTOR, "#tab-studies").click()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#study-select option"))
    Select(b.find_element(By.CSS_SELECTOR, "#study-select")).select_by_value("smoke")
    # One picture per cell (2 sizes x 2 W), the cell's 3 seeds stepped through with its button.
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#study-grid td img")) == 4)
    cells = b.find_elements(By.CSS_SELECTOR, "#study-grid td")
    assert [c.find_element(By.CSS_SELECTOR, ".cell-step").text for c in cells] == ["1/3 >"] * 4
    heads = [h.text for h in b.find_elements(By.CSS_SELECTOR, "#study-grid th")]
    x_axis, y_axis = (
        Select(b.find_element(By.CSS_SELECTOR, sel)).first_selected_option.text
        for sel in ("#axis-x", "#axis-y")
    )
    assert {x_axis, y_axis} == {"size", "W"}
    assert all(h.startswith(f"{x_axis} = ") for h in heads[1:3]) and all(
        h.startswith(f"{y_axis} = ") for h in heads[3:]
    )
    seeds = []
    for _ in range(3):
        title = cells[0].find_element(By.CSS_SELECTOR, "img").get_attribute("title")
        seeds.append(title.split(" seed ")[1].split(" ")[0])
        cells[0].find_element(By.CSS_SELECTOR, ".cell-step").click()
    assert len(set(seeds)) == 3 and cells[0].find_element(By.CSS_SELECTOR, ".cell-step").text == "1/3 >"
    # The report's plots: built by the server on first sight, shown as loaded images.
    plots = wait_for(lambda: loaded_images(b, "#study-plots img"), 180)
    assert all(int(str(p["width"])) > 100 and int(str(p["height"])) > 100 for p in plots)
    assert all("/voidprompt/v1/studies/smoke/report/figures/" in str(p["src"]) for p in plots)
    assert b.find_element(By.CSS_SELECTOR, "#report-error").text == ""
    assert "figures, built" in b.find_element(By.CSS_SELECTOR, "#report-status").text
    b.save_screenshot(str(artifacts / "02-study.png"))
    b.execute_script("document.querySelector('#study-report').scrollIntoView()")
    b.save_screenshot(str(artifacts / "02-report.png"))

    # Labeling: ten images with the keyboard (1-4 classes, an arrow, an undo). The last two images
    # carry a labeler's pre-label, counted apart from a person's labels.
    import httpx

    listed = httpx.get(
        study_server.url + "/voidprompt/v1/studies/smoke/images?unlabeled=true", timeout=60
    ).json()
    prelabeled = [im["id"] for im in listed["images"][-2:]]
    for image_id in prelabeled:
        put = httpx.put(
            f"{study_server.url}/voidprompt/v1/studies/smoke/labels/{image_id}",
            json={"label_class": listed["classes"][0], "source": "detector"},
            timeout=60,
        )
        assert put.status_code == 200, put.text
    b.find_element(By.CSS_SELECTOR, "#tab-label").click()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#label-study option"))
    Select(b.find_element(By.CSS_SELECTOR, "#label-study")).select_by_value("smoke")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#label-grid .cell")) >= 10)
    ids = [int(c.get_attribute("data-id")) for c in b.find_elements(By.CSS_SELECTOR, "#label-grid .cell")]
    grid = b.find_element(By.CSS_SELECTOR, "#label-grid")
    grid.click()
    b.execute_script(
        "document.querySelector('#label-grid .cell').click(); document.querySelector('#label-grid').focus();"
    )
    keys = ["1", "2", "3", "4", "1", "2", "3", "4", "1"]
    for key in keys:
        grid.send_keys(key)
        time.sleep(0.2)
    # A wrong label on the tenth, undone with z, then the right one.
    grid.send_keys("4")
    wait_for(lambda: "10 / 12 labeled" in b.find_element(By.CSS_SELECTOR, "#label-progress").text, 30)
    grid.send_keys("z")
    wait_for(lambda: "9 / 12 labeled" in b.find_element(By.CSS_SELECTOR, "#label-progress").text, 30)
    grid.send_keys("2")
    wait_for(lambda: "10 / 12 labeled" in b.find_element(By.CSS_SELECTOR, "#label-progress").text, 30)
    grid.send_keys(Keys.ARROW_LEFT)
    progress = b.find_element(By.CSS_SELECTOR, "#label-progress").text
    assert progress == "10 / 12 labeled by a person \u00b7 2 pre-labeled by detector"
    b.save_screenshot(str(artifacts / "03-label.png"))
    for image_id in prelabeled:
        httpx.put(
            f"{study_server.url}/voidprompt/v1/studies/smoke/labels/{image_id}",
            json={"label_class": None, "source": "detector"},
            timeout=60,
        )
    assert b.find_element(By.CSS_SELECTOR, "#label-error").text == ""

    # The study's own classes, in its order (keys 1-4 pick them).
    classes = httpx.get(study_server.url + "/voidprompt/v1/studies/smoke/images?limit=1", timeout=60).json()[
        "classes"
    ]
    assert len(classes) == 4
    expected = [classes[int(k) - 1] for k in keys] + [classes[1]]
    catalog_path = study_server.root / "studies" / "runs" / "smoke" / "catalog.sqlite"
    with Catalog.open(catalog_path, readonly=True) as catalog:
        got = [catalog.labels(image_id).get("human", (None, []))[0] for image_id in ids[:10]]
    assert got == expected

    for name in ("01-generate.png", "02-study.png", "02-report.png", "03-label.png"):
        assert (artifacts / name).stat().st_size > 1000


@pytest.mark.slow  # a browser driving the web UI
def test_model_selector_lists_sdxl_and_switches(browser, xl_server, artifacts) -> None:  # type: ignore[no-untyped-def]
    """SD1 and SDXL checkpoints side by side in the selector, each with its family; picking the
    SDXL one loads it, and the next picture is made on it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    b = browser
    b.get(xl_server.url + "/")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#model-select option")) == 3)
    options = {
        o.get_attribute("value").split(" [")[0]: o.text
        for o in b.find_elements(By.CSS_SELECTOR, "#model-select option")
    }
    assert options == {
        "tiny.safetensors": "tiny - SD1",
        "tiny-refiner.safetensors": "tiny-refiner - SDXL refiner",
        "tiny-xl.safetensors": "tiny-xl - SDXL",
    }
    assert b.find_element(By.CSS_SELECTOR, "#model-family").text == "SD1 - trained at 512x512"
    xl_title = next(
        v
        for v in (o.get_attribute("value") for o in b.find_elements(By.CSS_SELECTOR, "#model-select option"))
        if v.startswith("tiny-xl")
    )
    Select(b.find_element(By.CSS_SELECTOR, "#model-select")).select_by_value(xl_title)
    wait_for(lambda: b.find_element(By.CSS_SELECTOR, "#model-name").text == xl_title)
    assert b.find_element(By.CSS_SELECTOR, "#model-family").text == "SDXL - trained at 1024x1024"
    try:
        for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "2"), ("#seed", "77")):
            box = b.find_element(By.CSS_SELECTOR, field)
            box.clear()
            box.send_keys(value)
        b.find_element(By.CSS_SELECTOR, "#generate").click()
        infotext = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#gallery .infotext"), 120)[0].text
        assert "Model: tiny-xl," in infotext and "Size: 64x64" in infotext
        b.save_screenshot(str(artifacts / "03-sdxl-model.png"))
    finally:
        # The server is shared by the other SDXL tests, which start from SD1.
        import httpx

        httpx.post(xl_server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "tiny"}, timeout=60)


@pytest.mark.slow  # a browser driving the web UI, generating on the shipped model
def test_explain_tag_picker_and_step_slider(browser, study_server, artifacts, synthetic) -> None:  # type: ignore[no-untyped-def]
    """Generate with Explain on: the tag picker lists the prompt's and the negative prompt's tags with
    their weights and overlays the chosen tag's heatmap on the picture; the step slider shows the
    three previews and the difference map of the chosen step. A study image's explanation file
    shows in the study's image detail."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from voidprompt.explain.store import save_explanation

    b = browser
    b.get(study_server.url + "/")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#sampler option")) > 5)
    for field, value in (("#width", "64"), ("#height", "64"), ("#steps", "6"), ("#seed", "99")):
        box = b.find_element(By.CSS_SELECTOR, field)
        box.clear()
        box.send_keys(value)
    b.find_element(By.CSS_SELECTOR, "#prompt").send_keys("red circle")
    b.find_element(By.CSS_SELECTOR, "#negative_prompt").send_keys("lowres, (blurry:1.3)")
    b.find_element(By.CSS_SELECTOR, "#explain").click()
    b.find_element(By.CSS_SELECTOR, "#generate").click()

    options = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#gen-explain .explain-tag option"), 120)
    keys = [o.get_attribute("value") for o in options]
    assert keys == ["positive:red circle", "negative:lowres", "negative:blurry"]
    assert options[2].text == "blurry \u00b7 weight 1.3"
    groups = [g.get_attribute("label") for g in b.find_elements(By.CSS_SELECTOR, "#gen-explain optgroup")]
    assert groups == ["Prompt", "Negative prompt"]
    overlay = wait_for(lambda: loaded_images(b, "#gen-explain .explain-overlay"))[0]
    assert (overlay["width"], overlay["height"]) == (64, 64)
    assert "tag=positive%3Ared%20circle" in str(overlay["src"]) and "window=all" in str(overlay["src"])
    Select(b.find_element(By.CSS_SELECTOR, "#gen-explain .explain-tag")).select_by_value("negative:blurry")
    Select(b.find_element(By.CSS_SELECTOR, "#gen-explain .explain-window")).select_by_value("late")
    overlay = wait_for(
        lambda: [
            i
            for i in loaded_images(b, "#gen-explain .explain-overlay")
            if "negative%3Ablurry" in str(i["src"])
        ]
    )[0]
    assert "window=late" in str(overlay["src"]) and (overlay["width"], overlay["height"]) == (64, 64)
    assert (
        "blurry (weight 1.3, late): attention share"
        in b.find_element(By.CSS_SELECTOR, "#gen-explain .explain-measures").text
    )

    # The slider: one preview per denoiser call (6 steps of Euler a), the last shown first.
    url = (
        study_server.url
        + str(b.execute_script("return document.querySelector('#gen-explain .explain-overlay').src"))
        .split(study_server.url, 1)[1]
        .split("/heatmap.png")[0]
    )
    described = httpx.get(url, timeout=60).json()
    slider = b.find_element(By.CSS_SELECTOR, "#gen-explain .explain-step")
    assert slider.get_attribute("max") == "5" and slider.get_attribute("value") == "5"
    b.execute_script("const s = arguments[0]; s.value = '1'; s.dispatchEvent(new Event('input'));", slider)
    shown = wait_for(
        lambda: (
            len(loaded_images(b, "#gen-explain .explain-previews img")) == 4
            and loaded_images(b, "#gen-explain .explain-previews img")
        )
    )
    assert [str(i["alt"]) for i in shown] == [
        "Prompt, preview 2",
        "Negative prompt, preview 2",
        "Combined, preview 2",
        "Difference |cond \u2212 uncond|, preview 2",
    ]
    height, width = described["latent_size"]
    assert all((i["width"], i["height"]) == (width, height) for i in shown)
    assert all("/previews/1/" in str(i["src"]) for i in shown)
    assert "call 2 of 6" in b.find_element(By.CSS_SELECTOR, "#gen-explain .explain-step-label").text
    b.execute_script("document.querySelector('#gen-explain').scrollIntoView()")
    b.save_screenshot(str(artifacts / "04-explain.png"))

    # A study image's explanation file, in the study's image detail.
    registry = study_server.app.state.voidprompt.studies
    entry = registry.get("smoke")
    first = httpx.get(study_server.url + "/voidprompt/v1/studies/smoke/images", timeout=60).json()["images"][
        0
    ]
    picture, explanation = registry.explanation_file(entry, first["id"])
    before = explanation.read_bytes() if explanation.exists() else None
    save_explanation(explanation, synthetic.build())
    try:
        b.find_element(By.CSS_SELECTOR, "#tab-studies").click()
        wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#study-select option"))
        Select(b.find_element(By.CSS_SELECTOR, "#study-select")).select_by_value("smoke")
        wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#study-grid td img")) == 4)
        # Step each cell through its pictures until the wanted one shows, then open it.
        b.execute_script(
            "for (const td of document.querySelectorAll('#study-grid td')) {"
            "  for (let n = 0; n < 3; n += 1) {"
            "    const img = td.querySelector('img');"
            "    if (img.title.startsWith(arguments[0])) { img.click(); return; }"
            "    td.querySelector('.cell-step').click();"
            "  }"
            "}",
            f"#{first['id']} ",
        )
        options = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#study-detail .explain-tag option"), 60)
        assert [o.text for o in options] == ["red ball \u00b7 weight 1", "lowres \u00b7 weight 1.3"]
        overlay = wait_for(lambda: loaded_images(b, "#study-detail .explain-overlay"))[0]
        assert (overlay["width"], overlay["height"]) == (first["width"], first["height"])
        skipped = wait_for(
            lambda: b.find_elements(By.CSS_SELECTOR, "#study-detail .explain-previews .skipped")
        )
        assert len(skipped) == 2  # the last preview's call ran no negative prompt: no picture, no difference
        b.execute_script("document.querySelector('#study-detail .study-explain').scrollIntoView()")
        b.save_screenshot(str(artifacts / "05-study-explain.png"))
    finally:
        explanation.unlink(missing_ok=True)
        if before is not None:
            explanation.write_bytes(before)
    assert picture.is_file()

"""The web UI's Lab tab in headless Chromium: designing a study from an image (live job count, the
error at its field, saving), then - slow - queueing it, pausing and resuming it while watching its
progress, opening its grid and report, and comparing two of its pictures.

One browser is shared by the module; the first test is the quick suite's scenario, the other is
slow. Screenshots go to $VOIDPROMPT_TEST_ARTIFACTS (default: a pytest temporary folder).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from voidprompt.testing.browser import artifacts_dir, chromium_available, headless_chromium, wait_for

pytestmark = pytest.mark.skipif(
    not chromium_available(), reason="chromium / chromium-driver / selenium not installed"
)

INFOTEXT = (
    "a red ball\nNegative prompt: lowres\nSteps: 1, Sampler: Euler, CFG scale: 5, Seed: 11, Size: 64x64"
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with headless_chromium(tmp_path_factory.mktemp("lab-profile")) as driver:
        driver.set_window_size(1400, 1400)
        yield driver


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return artifacts_dir(tmp_path_factory)




def row_state(driver, row: str) -> str:  # type: ignore[no-untyped-def]
    """The queue row's state ("" while it is not drawn)."""
    script = f"const r = document.querySelector(\"{row}\"); return r ? r.dataset.state : '';"
    return str(driver.execute_script(script))


def row_done(driver, row: str) -> int:  # type: ignore[no-untyped-def]
    """The images done, as the queue row's progress bar shows them."""
    script = f'const p = document.querySelector("{row} progress"); return p ? p.value : 0;'
    return int(driver.execute_script(script))


def text(driver, selector: str) -> str:  # type: ignore[no-untyped-def]
    """The text of the first element ``selector`` finds, read at one moment (the Lab redraws its
    lists at every change), or "" when there is none."""
    found = driver.execute_script(
        "const n = document.querySelector(arguments[0]); return n ? n.innerText : '';", selector
    )
    return str(found)


def click(driver, selector: str) -> None:  # type: ignore[no-untyped-def]
    """Click a queue button as it is now (the queue's rows are redrawn at every change)."""
    driver.execute_script("document.querySelector(arguments[0]).click();", selector)


def row_values(driver, container: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The rows of a Lab list as {name: value}, read at one moment (the list may be redrawn)."""
    script = (
        "return Object.fromEntries([...document.querySelectorAll(arguments[0] + ' .lab-row')]"
        ".map(r => [r.querySelector('.lab-key').value, r.querySelector('.lab-value').value]));"
    )
    values: dict[str, str] = driver.execute_script(script, container)
    return values


def value_input(driver, container: str, name: str):  # type: ignore[no-untyped-def]
    """The value box of the row ``name`` of a Lab list."""
    script = (
        "return [...document.querySelectorAll(arguments[0] + ' .lab-row')]"
        ".find(r => r.querySelector('.lab-key').value === arguments[1]).querySelector('.lab-value');"
    )
    return driver.execute_script(script, container, name)


def open_page(driver, url: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    driver.get(url + "/")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#sampler option"), what="the page")
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#tab-lab"), what="the Lab tab")


def set_value(element, value: str) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(value)


def test_design_a_two_axis_study_from_an_image(browser, server, artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    b = browser
    picture = tmp_path / "source.png"
    meta = PngInfo()
    meta.add_text("parameters", INFOTEXT)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture, pnginfo=meta)

    open_page(b, server.url)
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#model-select option")) > 0, what="the models")
    b.find_element(By.CSS_SELECTOR, "#tab-lab").click()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#lab-jobs"), what="the first check")
    b.find_element(By.CSS_SELECTOR, "#lab-from-image").send_keys(str(picture))
    # The image's infotext becomes the fixed settings; the default axes take cfg_scale and seed.
    wait_for(lambda: row_values(b, "#lab-fields").get("prompt") == "a red ball", what="the image's fields")
    fields = row_values(b, "#lab-fields")
    assert fields["negative_prompt"] == "lowres"
    assert (fields["steps"], fields["seed"], fields["cfg_scale"]) == ("1", "11", "5")
    assert set(row_values(b, "#lab-axes")) == {"cfg_scale", "seed"}
    set_value(b.find_element(By.CSS_SELECTOR, "#lab-name"), "from-image")
    # The image's 64x64 (the check before it had the txt2img form's size).
    wait_for(lambda: "shapes: 64x64 (6)" in text(b, "#lab-summary"), what="the image's size")
    assert text(b, "#lab-jobs") == "6 images"
    assert "cfg_scale: 3, 5, 7" in text(b, "#lab-axis-values")
    # A bad axis value: study check's message, at the axis's row.
    set_value(value_input(b, "#lab-axes", "cfg_scale"), "3, 5, x")
    wait_for(lambda: text(b, ".lab-row.invalid .lab-row-error"), what="the error at the field")
    bad_row = b.find_element(By.CSS_SELECTOR, ".lab-row.invalid")
    assert bad_row.find_element(By.CSS_SELECTOR, ".lab-key").get_attribute("value") == "cfg_scale"
    assert "'x'" in text(b, ".lab-row.invalid .lab-row-error")
    b.save_screenshot(str(artifacts / "lab-01-design-error.png"))
    set_value(value_input(b, "#lab-axes", "cfg_scale"), "3, 7")
    wait_for(lambda: text(b, "#lab-jobs") == "4 images" and not text(b, ".lab-row-error"), what="4 images")
    b.find_element(By.CSS_SELECTOR, "#lab-save").click()
    wait_for(lambda: text(b, "#lab-saved").startswith("saved"), what="the save")
    b.save_screenshot(str(artifacts / "lab-02-design-saved.png"))
    saved = (server.root / "studies" / "from-image.toml").read_text(encoding="utf-8")
    assert 'positive = "a red ball"' in saved and 'cfg_scale = "3, 7"' in saved and "seed = 11" not in saved


@pytest.mark.slow  # a browser driving two study runs
def test_queue_pause_resume_watch_open_and_compare(browser, server, artifacts) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    b = browser
    open_page(b, server.url)
    b.find_element(By.CSS_SELECTOR, "#tab-lab").click()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#lab-jobs"), what="the first check")
    set_value(b.find_element(By.CSS_SELECTOR, "#lab-name"), "browser-run")
    set_value(value_input(b, "#lab-axes", "cfg_scale"), "3, 7")
    set_value(value_input(b, "#lab-axes", "seed"), "30 random")
    for name, value in (("steps", "1"), ("width", "64"), ("height", "64")):
        set_value(value_input(b, "#lab-fields", name), value)
    wait_for(lambda: text(b, "#lab-jobs") == "60 images", what="60 images")
    b.find_element(By.CSS_SELECTOR, "#lab-overwrite").click()
    b.find_element(By.CSS_SELECTOR, "#lab-save-queue").click()
    row = "#lab-queue tr[data-study='browser-run']"

    def state() -> str:
        return row_state(b, row)

    def done() -> int:
        return row_done(b, row)

    wait_for(lambda: state() == "running" and done() >= 3, 180, "images made")
    wait_for(lambda: text(b, f"{row} .q-rate") not in ("", "-"), 60, "a rate")
    assert text(b, f"{row} .q-eta") != "-"
    b.save_screenshot(str(artifacts / "lab-03-queue-running.png"))
    click(b, f"{row} .q-pause")
    wait_for(lambda: state() == "paused", 60, "paused")
    stopped_at = done()
    assert 3 <= stopped_at < 60
    b.save_screenshot(str(artifacts / "lab-04-queue-paused.png"))
    click(b, f"{row} .q-resume")
    wait_for(lambda: state() in ("queued", "running", "done"), 30, "resumed")
    try:
        wait_for(lambda: state() == "done", 300, "the study's end")
    except AssertionError:
        raise AssertionError(httpx.get(f"{server.url}/voidprompt/v1/queue").json()) from None
    assert done() == 60
    b.save_screenshot(str(artifacts / "lab-05-queue-done.png"))
    catalog = server.root / "studies" / "runs" / "browser-run" / "catalog.sqlite"
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images").fetchone() == (60, 60)

    # Its grid and report in the Studies tab.
    click(b, f"{row} .q-open")
    wait_for(
        lambda: not b.find_element(By.CSS_SELECTOR, "#view-studies").get_attribute("hidden"), what="Studies"
    )
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#study-grid img")) >= 2, 60, "the grid")
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#study-plots img"), 180, "the report's plots")
    b.save_screenshot(str(artifacts / "lab-06-study-grid.png"))
    b.execute_script("document.querySelector('#study-report').scrollIntoView();")
    b.save_screenshot(str(artifacts / "lab-06-study-report.png"))

    # Two of its pictures, picked in the grid, side by side: a row of the grid differs by cfg_scale.
    cells = b.find_elements(By.CSS_SELECTOR, "#study-grid tr:nth-child(2) td img")
    assert len(cells) == 2
    for cell in cells:
        cell.click()
    wait_for(lambda: "Picked:" in text(b, "#compare-picks-text"), what="the picks")
    b.find_element(By.CSS_SELECTOR, "#compare-picks-run").click()
    wait_for(lambda: text(b, "#cmp-diff"), what="the comparison")
    diff = text(b, "#cmp-diff")
    assert "cfg_scale" in diff and "axis:cfg_scale" in diff and "seed" not in diff.replace("axis:", "")
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, ".cmp-side img")) == 2, what="two pictures")
    b.save_screenshot(str(artifacts / "lab-07-compare.png"))


@pytest.mark.slow  # a browser watching a study run across two servers
def test_a_restarted_server_shows_the_study_where_it_stopped_and_resumes_it(  # type: ignore[no-untyped-def]
    browser, tiny_checkpoint, server_tools, artifacts, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    make_config, start_server = server_tools
    (tmp_path / "studies").mkdir()
    config = make_config(tmp_path, tiny_checkpoint)
    b = browser
    row = "#lab-queue tr[data-study='restarted']"

    def state() -> str:
        return row_state(b, row)

    def done() -> int:
        return row_done(b, row)

    first = start_server(config)
    running = next(first)
    open_page(b, running.url)
    b.find_element(By.CSS_SELECTOR, "#tab-lab").click()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#lab-jobs"), what="the first check")
    set_value(b.find_element(By.CSS_SELECTOR, "#lab-name"), "restarted")
    set_value(value_input(b, "#lab-axes", "seed"), "100 random")
    for name, value in (("steps", "1"), ("width", "64"), ("height", "64")):
        set_value(value_input(b, "#lab-fields", name), value)
    wait_for(lambda: text(b, "#lab-jobs") == "300 images", what="300 images")
    b.find_element(By.CSS_SELECTOR, "#lab-save-queue").click()
    wait_for(lambda: state() == "running" and done() >= 2, 180, "images made")
    b.get("about:blank")  # the page lets go of the first server's event stream
    next(first, None)  # the server stops, and its run with it
    catalog = tmp_path / "studies" / "runs" / "restarted" / "catalog.sqlite"
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        made = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    assert 2 <= made < 300

    config.port = make_config(tmp_path, tiny_checkpoint).port
    second = start_server(config)
    running = next(second)
    try:
        open_page(b, running.url)
        b.find_element(By.CSS_SELECTOR, "#tab-lab").click()
        wait_for(lambda: state() != "", what="the queue after the restart")
        # Where it stopped (its catalog's images), and back in line.
        assert done() >= made and state() in ("queued", "running", "done")
        b.save_screenshot(str(artifacts / "lab-08-after-restart.png"))
        wait_for(lambda: state() == "done", 300, "the study's end")
        assert done() == 300
    finally:
        b.get("about:blank")
        next(second, None)
    with sqlite3.connect(f"file:{catalog}?mode=ro", uri=True) as db:
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images").fetchone() == (300, 300)
    pictures = [p for p in (catalog.parent / "catalog-images").rglob("*.png")]
    assert len(pictures) == 300

"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) at 1400 x 900 against a real `inspector dashboard` process on a database filled by the real
pipeline (`inspector watch --once` over generated parts: square, one wide, one tall).

A reviewer's shift in small: 20 verdicts with the keyboard, timed from the key press to the next image shown
(the median and 95th percentile are printed and written to ``timings.json``), then undo; screenshots of the
review page for the wide and the tall image and of the thresholds page, with image, overlay and the verdict
buttons checked to lie above the fold. Screenshots go to ``$INSPECTOR_SCREENSHOTS`` (or the test's tmp_path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from inspector.store import images, reviews, thresholds

from .pgcluster import free_port
from .pipeline_helpers import cli_env, run_cli, table_rows, wait_for

WIDTH, HEIGHT = 1400, 900
#: Square parts reviewed with the keyboard (20 verdicts need at least 20 unreviewed images besides the two).
SQUARE = 22

#: Records, in the page's clock, the last key press and when each overlay picture is on screen (its <img>
#: loaded with an image number other than the one shown at the key press).
RECORD_SHOWN = """
window.keyAt = null; window.keyFrom = null; window.shown = null;
const overlay = () => [...document.querySelectorAll("img[alt^='overlay of image #']")]
    .filter(i => i.complete && i.naturalWidth > 0);
const current = () => { const imgs = overlay(); return imgs.length ? imgs[imgs.length - 1].alt.split('#')[1] : null; };
const check = () => {
    if (window.keyAt === null || window.shown !== null) return;
    const next = overlay().map(i => i.alt.split('#')[1]).find(id => id !== window.keyFrom);
    if (next !== undefined) window.shown = {id: next, at: performance.now()};
};
document.addEventListener("keydown", e => {
    if (e.key.length === 1) { window.keyFrom = current(); window.shown = null; window.keyAt = performance.now(); }
}, true);
document.addEventListener("load", check, true);  // an <img> finished loading (load does not bubble: capture)
new MutationObserver(check).observe(document.body, {subtree: true, childList: true, attributes: true});
window.currentImage = current;
"""

def part(size: tuple[int, int], seed: int) -> Image.Image:
    """A machined part on a grey table: a shaded plate with holes and a scratch (smooth, so screenshots
    compress well)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    table = (90 + 40 * x / w + 20 * y / h)[..., None] * np.array([1.0, 1.0, 1.05])
    image = Image.fromarray(table.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    m = min(w, h) // 10
    draw.rounded_rectangle([m, m, w - m, h - m], radius=m, fill=(178, 182, 188), outline=(120, 124, 130), width=3)
    for _ in range(3):
        cx, cy, r = rng.integers(2 * m, w - 2 * m), rng.integers(2 * m, h - 2 * m), m // 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(70, 72, 76))
    x0, y0 = rng.integers(2 * m, w - 3 * m), rng.integers(2 * m, h - 3 * m)
    draw.line([x0, y0, x0 + m, y0 + m // 2], fill=(40, 36, 34), width=max(2, m // 12))
    return image.filter(ImageFilter.GaussianBlur(0.8))


@pytest.fixture
def dashboard(tmp_path):
    folder = tmp_path / "line1" / "test" / "scratch"
    folder.mkdir(parents=True)
    for i in range(SQUARE):
        part((384, 384), 10 + i).save(folder / f"{i:03d}.png")
    part((1600, 400), 1).save(folder / "wide.png")
    part((300, 1200), 2).save(folder / "tall.png")
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", str(tmp_path / "line1"), "--class-name", "screw", "--once", "--recursive"], db,
                   tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    port = free_port()
    with open(tmp_path / "dashboard.log", "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "inspector.cli", "dashboard", "--port", str(port)],
                                   cwd=tmp_path, env=cli_env(db), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).read() == b"ok"
        except OSError:
            return False

    try:
        wait_for(healthy, 90, what="streamlit health")
        yield f"http://127.0.0.1:{port}/", db
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "Debian's chromium and chromium-driver are required (scripts/test.sh installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    # the viewport itself (not the window) is 1400 x 900: what a laptop's browser shows
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("INSPECTOR_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _sign_in(browser, wait, url: str, image_id: int | None = None) -> None:
    """Open the review page (on one image with ``?image=``), enter the reviewer's name, wait until the verdict
    buttons are live and the overlay is on screen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    browser.get(url + (f"?image={image_id}" if image_id is not None else ""))
    name = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input[aria-label^='Your name']")))
    name.send_keys("carol", Keys.ENTER)
    wait.until(lambda d: not _verdict_button(d, "Reject").get_attribute("disabled"))
    alt = f"overlay of image #{image_id}" if image_id is not None else "overlay of image #"
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll(`img[alt^='${arguments[0]}']`)].some(i => i.complete && "
        "i.naturalWidth > 0)", alt))
    browser.execute_script("document.activeElement.blur()")  # the keys go to the page, not the name field


def _verdict_button(driver, label: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//button[.//p[text()='{label}']]")


def _above_the_fold(browser, image_id: int) -> dict[str, dict]:
    """The on-screen boxes of the image, its overlay and the three verdict buttons (page scrolled to the top)."""
    from selenium.webdriver.common.by import By

    browser.execute_script("window.scrollTo(0, 0)")
    boxes = {}
    for alt in ("image", "overlay of image"):
        (element,) = browser.find_elements(By.CSS_SELECTOR, f"img[alt='{alt} #{image_id}']")
        boxes[alt] = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()", element)
    for label in ("Accept", "Reject", "Skip"):
        boxes[label] = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()",
                                              _verdict_button(browser, label))
    assert browser.execute_script("return [innerWidth, innerHeight]") == [WIDTH, HEIGHT]
    for what, box in boxes.items():
        assert box["width"] > 0 and box["height"] > 0, what
        assert 0 <= box["top"] and box["bottom"] <= HEIGHT and 0 <= box["left"] and box["right"] <= WIDTH, (what, box)
    return boxes


def test_review_screens_for_wide_and_tall_images_fit_1400_by_900(dashboard, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, db = dashboard
    wait = WebDriverWait(browser, 60)
    by_name = {Path(r["path"]).name: r for r in table_rows(db, images)}
    for name, shot in (("wide.png", "review-wide.png"), ("tall.png", "review-tall.png"),
                       ("000.png", "review-square.png")):
        row = by_name[name]
        _sign_in(browser, wait, url, row["id"])
        boxes = _above_the_fold(browser, row["id"])
        browser.save_screenshot(str(shots / shot))
        image, overlay = boxes["image"], boxes["overlay of image"]
        if name == "wide.png":  # one above the other, the full width they can take
            assert overlay["top"] >= image["bottom"] and image["width"] >= 900
        else:  # side by side, a small image not blown up to the column
            assert overlay["left"] >= image["right"] and abs(overlay["top"] - image["top"]) < 2
        if name == "000.png":
            assert image["width"] <= 2 * 384
        # a zoom crop at full resolution (these parts are larger than the 256 px crop)
        assert browser.find_elements(By.CSS_SELECTOR, f"img[alt='zoom of image #{row['id']}']")
        # the source is named in full (not just 000.png)
        assert row["path"] in browser.page_source
        assert Image.open(shots / shot).size == (WIDTH, HEIGHT)


def test_twenty_verdicts_with_the_keyboard_then_thresholds(dashboard, browser, shots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, db = dashboard
    wait = WebDriverWait(browser, 60)
    _sign_in(browser, wait, url)
    browser.execute_script(RECORD_SHOWN)
    keys = "ad" * 10
    seconds, seen = [], []
    for key in keys:
        before = browser.execute_script("return window.currentImage()")
        seen.append(int(before))
        ActionChains(browser).send_keys(key).perform()
        shown = wait.until(lambda d: d.execute_script("return window.shown"))
        assert shown["id"] != before
        seconds.append((shown["at"] - browser.execute_script("return window.keyAt")) / 1000)
    median = statistics.median(seconds)
    p95 = float(np.percentile(seconds, 95))
    figures = {"verdicts": len(seconds), "median_s": round(median, 3), "p95_s": round(p95, 3),
               "max_s": round(max(seconds), 3), "all_s": [round(s, 3) for s in seconds]}
    print(f"\nkey press -> next image shown over {len(seconds)} verdicts: median {median:.3f} s, p95 {p95:.3f} s "
          f"(target < 0.5 s)")
    (shots / "timings.json").write_text(json.dumps(figures, indent=1))
    saved = table_rows(db, reviews)
    expected = [("normal" if k == "a" else "defect", i, "carol") for k, i in zip(keys, seen)]
    assert [(r["verdict"], r["image_id"], r["reviewer"]) for r in saved] == expected
    assert len(set(seen)) == 20, "every key moved on to a new image"
    assert p95 < 3.0, figures  # the target is 0.5 s; this bound only keeps a loaded 2-core box from flaking
    # u undoes the last verdict: a new review row, the image comes back
    ActionChains(browser).send_keys("u").perform()
    wait.until(lambda d: d.execute_script("return window.shown && window.shown.id") == str(seen[-1]))
    wait_for(lambda: len(table_rows(db, reviews)) == 21, 30, what="the undo row")
    assert table_rows(db, reviews)[-1]["verdict"] == "unreviewed"

    # thresholds: move the slider with the keyboard, save a new version; the header shows it at once
    browser.find_element(By.CSS_SELECTOR, "a[data-testid='stTopNavLink'][href$='/thresholds']").click()
    thumb = "input[type='range'][aria-label='Threshold']"  # the slider's (visually hidden) range input
    slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, thumb))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']")) == 3)
    # nothing of the review page is left half-drawn on this one
    assert not browser.find_elements(By.CSS_SELECTOR, "img[alt^='overlay of image #']")
    assert not browser.find_elements(By.XPATH, "//button[.//p[text()='Accept' or text()='Reject']]")
    before, step = float(slider.get_attribute("value")), float(slider.get_attribute("step"))
    value = min(float(slider.get_attribute("max")), before + 25 * step)
    browser.execute_script("arguments[0].focus()", slider)
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT * 25).perform()
    wait.until(lambda d: abs(float(d.find_element(By.CSS_SELECTOR, thumb).get_attribute("value")) - value) < step / 2)
    # the slider sends its value to the app a moment (debounced) after the last key, and the app copies it
    # into the typed value: once that shows the slider's value, the app has it (a click before would save
    # an older one). Wait for that instead of sleeping.
    typed = "input[aria-label='Threshold value']"
    wait.until(lambda d: abs(float(d.find_element(By.CSS_SELECTOR, typed).get_attribute("value")) - value) < step / 2)
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[.//p[text()='Save threshold']]"))).click()
    wait_for(lambda: table_rows(db, thresholds), 60, what="a threshold version")
    wait.until(lambda d: "as v1" in d.page_source)  # the page confirms the saved version
    (row,) = table_rows(db, thresholds)
    assert row["class_name"] == "screw" and row["version"] == 1 and row["created_by"] == "carol"
    assert abs(row["value"] - value) < step / 2 and row["value"] != before
    in_force = wait.until(lambda d: d.find_element(
        By.XPATH, "//*[@data-testid='stMetric'][.//p[text()='Threshold in force']]//*[@data-testid='stMetricValue']"))
    assert float(in_force.text) == pytest.approx(row["value"], abs=1e-5)
    wait.until(lambda d: "nothing to roll back to" in d.page_source)  # v1 in force: no rollback to itself
    assert not browser.find_elements(By.XPATH, "//button[.//p[text()='Roll back']]")
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shots / "thresholds.png"))
    curves = browser.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']")[1]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", curves)
    browser.save_screenshot(str(shots / "thresholds-curves.png"))
    assert "AUROC" in browser.page_source and "AP " in browser.page_source

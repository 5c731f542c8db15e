"""The dashboard in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) against a real `inspector dashboard` process on a database filled by the real pipeline.

Screenshots of the review and threshold pages are written to ``test-artifacts/`` (or
``$INSPECTOR_TEST_ARTIFACTS``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from inspector.store import reviews, thresholds

from .pgcluster import free_port
from .pipeline_helpers import cli_env, scored_database, table_rows, wait_for

ARTIFACTS = Path(os.environ.get("INSPECTOR_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))

#: Records the time (performance.now()) of the last key press and of each message to the app that carries the
#: threshold slider's value: Streamlit sends widget values in rerun requests over the page's WebSocket, the
#: slider's debounced after a key (while Selenium may still be dispatching the next ones).
RECORD_SLIDER_COMMITS = """
window.sliderCommits = [];
window.lastKey = Infinity;
document.addEventListener("keydown", () => { window.lastKey = performance.now(); }, true);
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
    const bytes = typeof data === "string" ? new TextEncoder().encode(data)
        : data instanceof ArrayBuffer ? new Uint8Array(data)
        : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    if (new TextDecoder("latin1").decode(bytes).includes("t_value")) window.sliderCommits.push(performance.now());
    return send.call(this, data);
};
"""


@pytest.fixture
def dashboard(tmp_path):
    db = scored_database(tmp_path, count=5, seed=900, size=96)
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
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100",
                "--disable-gpu"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_review_and_threshold_in_a_real_browser(dashboard, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, db = dashboard
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    name = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "input[aria-label^='Your name']")))
    name.send_keys("carol", Keys.ENTER)
    # the review page shows the current image with its heatmap overlay
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid='stImage'] img, [data-testid='stImageContainer'] img"))
    wait.until(lambda d: not d.find_element(By.XPATH, "//button[.//p[contains(., 'Reject as defect')]]")
               .get_attribute("disabled"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "review.png"))
    # accept with the keyboard shortcut (focus away from the text field first)
    browser.find_element(By.TAG_NAME, "h2").click()
    ActionChains(browser).send_keys("a").perform()
    wait_for(lambda: table_rows(db, reviews), 60, what="a review row")
    saved = table_rows(db, reviews)
    assert [(r["verdict"], r["reviewer"]) for r in saved] == [("normal", "carol")]

    # thresholds: move the slider with the keyboard, save a new version
    browser.find_element(By.XPATH, "//label[.//p[text()='Thresholds']]").click()
    thumb = "input[type='range'][aria-label='Threshold']"  # the slider's (visually hidden) range input
    try:
        slider = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, thumb))
    finally:
        browser.save_screenshot(str(ARTIFACTS / "thresholds-opened.png"))
    before = float(slider.get_attribute("value"))
    browser.execute_script(RECORD_SLIDER_COMMITS)
    browser.execute_script("arguments[0].focus()", slider)
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT * 25).perform()
    wait.until(lambda d: float(d.find_element(By.CSS_SELECTOR, thumb).get_attribute("value")) != before)
    # the slider sends its value to the app a moment (debounced) after the last key; a click before that
    # would save the old value: wait for that message instead of sleeping
    wait.until(lambda d: d.execute_script("return window.sliderCommits.some(t => t > window.lastKey)"))
    value = float(browser.find_element(By.CSS_SELECTOR, thumb).get_attribute("value"))
    wait.until(ec.element_to_be_clickable((By.XPATH, "//button[.//p[text()='Save threshold']]"))).click()
    wait_for(lambda: table_rows(db, thresholds), 60, what="a threshold version")
    wait.until(lambda d: "as v1" in d.page_source)  # the page confirms the saved version
    history = wait.until(lambda d: d.find_element(By.XPATH, "//h3[contains(., 'History')]"))
    browser.execute_script("arguments[0].scrollIntoView()", history)
    browser.save_screenshot(str(ARTIFACTS / "thresholds.png"))
    (row,) = table_rows(db, thresholds)
    assert row["class_name"] == "screw" and row["version"] == 1 and row["created_by"] == "carol"
    assert abs(row["value"] - value) < 1e-6 and row["value"] != before

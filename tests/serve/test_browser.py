"""The page in a real browser: Debian's headless Chromium uploads an image through the file input.

Needs ``chromium`` and ``chromium-driver`` (apt; ``.ci/run`` installs them) and selenium (the test
extra). The screenshot is kept as ``test-artifacts/serve-page.png`` in the repository.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web service needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tidy_detect.serve import ServeSettings, create_app  # noqa: E402

from tests.serve.conftest import image_bytes  # noqa: E402

from tests.browser import ARTIFACTS, MARKS, serve_in_thread, start_browser  # noqa: E402

pytestmark = MARKS


@pytest.fixture(scope="module")
def server(served):
    """The app on a free loopback port, in a thread of this process, with the session's detector."""
    with serve_in_thread(create_app(served["detector"], ServeSettings(max_wait_ms=5))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    driver = start_browser(1280, 1100, console_logs=True)
    yield driver
    driver.quit()


def image_with_objects(detector, tmp_path: Path) -> tuple[Path, dict]:
    """A random image for which the tiny models ground at least one object, and its record."""
    for seed in range(40):
        data = image_bytes(seed=seed, size=(320, 240), fmt="JPEG")
        record = detector.predict([data], names=["photo.jpg"])[0]
        if record["objects"]:
            path = tmp_path / "photo.jpg"
            path.write_bytes(data)
            return path, record
    pytest.fail("no random image got a grounded object from the tiny models")


def test_upload_shows_verdict_caption_and_boxes(server, browser, served, tmp_path):
    path, expected = image_with_objects(served["detector"], tmp_path)
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "server-status").get_attribute("data-status") == "ready")

    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result[data-state='done']"))

    card = browser.find_element(By.CSS_SELECTOR, "#results .result")
    verdict = card.find_element(By.CSS_SELECTOR, ".verdict")
    assert verdict.text == expected["label"].upper()
    assert verdict.get_attribute("data-label") == expected["label"]
    assert card.find_element(By.CSS_SELECTOR, ".p-fake").text == f"p_fake {expected['p_fake']:.3f}"
    assert card.find_element(By.CSS_SELECTOR, ".caption").text.endswith(expected["caption"])
    assert card.find_element(By.CSS_SELECTOR, ".file-name").text == "photo.jpg"

    boxes = card.find_elements(By.CSS_SELECTOR, "svg.overlay rect.box")
    assert len(boxes) == len(expected["objects"])
    for box, obj in zip(boxes, expected["objects"]):
        assert box.get_attribute("data-phrase") == obj["phrase"]
        assert float(box.get_attribute("x")) == pytest.approx(obj["box"][0])
        assert box.get_attribute("stroke").startswith("rgb(")  # coloured by discrepancy
        assert box.is_displayed()
    rows = card.find_elements(By.CSS_SELECTOR, "table.objects tbody tr")
    assert len(rows) == len(expected["objects"])
    legend = browser.find_element(By.ID, "legend")
    assert legend.is_displayed() and browser.find_element(By.ID, "legend-low").text

    # the image is shown, boxes lie over it, and nothing was fetched from another origin
    image = card.find_element(By.CSS_SELECTOR, "img.photo")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 320
    origins = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert set(origins) <= {server, "null"}, origins
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "serve-page.png"))


def test_several_images_and_a_bad_one(server, browser, served, tmp_path):
    good = [tmp_path / f"img{i}.png" for i in range(2)]
    for i, p in enumerate(good):
        p.write_bytes(image_bytes(seed=100 + i, size=(200, 150)))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "server-status").get_attribute("data-status") == "ready")
    # several files at once: one send_keys with newline-separated paths on a multiple file input
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in [*good, bad]))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result:not([data-state='pending'])")) == 3)
    cards = {c.find_element(By.CSS_SELECTOR, ".file-name").text: c
             for c in browser.find_elements(By.CSS_SELECTOR, "#results .result")}
    assert set(cards) == {"img0.png", "img1.png", "notes.png"}
    assert cards["notes.png"].get_attribute("data-state") == "error"
    message = cards["notes.png"].find_element(By.CSS_SELECTOR, ".error").text
    assert "notes.png: not an image" in message and "415" in message
    for name in ("img0.png", "img1.png"):
        assert cards[name].find_element(By.CSS_SELECTOR, ".verdict").text in ("FAKE", "REAL")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-page-several.png"))


def test_results_are_listed_in_upload_order(server, browser, served, tmp_path):
    # names out of alphabetical order, so a sorted list would not pass for an ordered one
    names = ["zebra.png", "apple.png", "mango.png"]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(image_bytes(seed=200 + i, size=(120, 90)))
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "server-status").get_attribute("data-status") == "ready")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(tmp_path / n) for n in names))
    shown = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#results .result .file-name")]
    assert shown == names  # listed as picked, before any result is back
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result[data-state='done']")) == 3)
    # a later pick goes below the earlier ones
    (tmp_path / "later.png").write_bytes(image_bytes(seed=210, size=(120, 90)))
    browser.find_element(By.ID, "file-input").send_keys(str(tmp_path / "later.png"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result[data-state='done']")) == 4)
    shown = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#results .result .file-name")]
    assert shown == [*names, "later.png"]


def test_random_weights_notice_for_the_tiny_bundle(server, browser, served, tmp_path):
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "random-weights").is_displayed())
    notice = browser.find_element(By.ID, "random-weights")
    assert "random weights" in notice.text and "meaningless" in notice.text
    assert "clip, captioner, grounder" in notice.text
    assert notice.location["y"] < browser.find_element(By.ID, "drop-zone").location["y"]  # seen before dropping
    path = tmp_path / "one.png"
    path.write_bytes(image_bytes(seed=220, size=(120, 90)))
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result[data-state='done']"))
    badge = browser.find_element(By.CSS_SELECTOR, "#results .result .random-badge")
    assert badge.is_displayed() and "random weights" in badge.text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-page-random-weights.png"))


def test_no_notice_for_models_without_the_mark(server, browser, served, monkeypatch):
    """A stand-in for a server on real models: /v1/info says no random weights, and the page says nothing."""
    monkeypatch.setattr(served["detector"], "random_weight_models", [])
    browser.get(server + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "server-status").get_attribute("data-status") == "ready")
    # the page asks /v1/info once the server is ready; give that answer time to arrive
    wait.until(lambda d: d.execute_script(
        "return performance.getEntriesByType('resource').some(e => e.name.endsWith('/v1/info'))"))
    time.sleep(0.5)
    assert not browser.find_element(By.ID, "random-weights").is_displayed()

"""The page's Provenance panel in a real browser (Debian's headless Chromium): verified C2PA, claims,
nothing found (said honestly), hostile metadata shown as text. The screenshot is kept as
``test-artifacts/serve-page-provenance.png``."""

from __future__ import annotations


import pytest

pytest.importorskip("fastapi", reason="the web service needs the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the web service needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from tidy_detect.detect import Detector  # noqa: E402
from tidy_detect.head import DiscrepancyHead  # noqa: E402
from tidy_detect.provenance import NOTHING_FOUND  # noqa: E402
from tidy_detect.serve import ServeSettings, create_app  # noqa: E402

from tests.browser import ARTIFACTS, MARKS, serve_in_thread, start_browser  # noqa: E402
from tests.provenance import fixtures as F  # noqa: E402

pytestmark = MARKS
INJECTION = '<img id="injected" src=x onerror="document.title=\'pwned\'">'


@pytest.fixture(scope="module")
def server(tiny_head, trusted):
    detector = Detector(*DiscrepancyHead.load(tiny_head["head"]), tiny_head["extractor"], provenance=trusted)
    with serve_in_thread(create_app(detector, ServeSettings(max_wait_ms=5))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    driver = start_browser(1280, 2400, console_logs=True)
    yield driver
    driver.quit()


def test_the_provenance_panel(server, browser, declared_files, tmp_path):
    folder = declared_files["folder"]
    hostile = tmp_path / "hostile.png"
    hostile.write_bytes(F.png_with_text({"Software": f"ComfyUI {INJECTION}"}))
    names = ["signed.jpg", "a1111.png", "plain.png", "laughs.jpg"]
    paths = [folder / n for n in names] + [hostile]
    browser.get(server + "/")
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: d.find_element(By.ID, "server-status").get_attribute("data-status") == "ready")
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result[data-state='done']")) == len(paths))
    cards = {c.find_element(By.CSS_SELECTOR, ".file-name").text: c
             for c in browser.find_elements(By.CSS_SELECTOR, "#results .result")}

    def panel(name):
        element = cards[name].find_element(By.CSS_SELECTOR, ".provenance")
        assert element.is_displayed(), name
        return element

    signed = panel("signed.jpg")
    assert signed.find_element(By.CSS_SELECTOR, ".provenance-badge").text == "declares AI: verified"
    assert signed.get_attribute("data-declares") == "ai"
    assert signed.find_element(By.CSS_SELECTOR, ".provenance-summary").text.startswith(
        "Verified Content Credentials declare generative AI")
    findings = signed.find_elements(By.CSS_SELECTOR, ".finding")
    assert {f.get_attribute("data-source") for f in findings} == {"c2pa"}
    assert all(f.find_element(By.CSS_SELECTOR, ".finding-trust").text == "verified" for f in findings)
    assert "signed by Test Signer" in signed.find_element(By.CSS_SELECTOR, ".provenance-extra").text

    claim = panel("a1111.png")
    assert claim.find_element(By.CSS_SELECTOR, ".provenance-badge").text == "declares AI: a claim"
    [item] = claim.find_elements(By.CSS_SELECTOR, ".finding")
    assert item.get_attribute("data-source") == "png-text" and "PNG text 'parameters'" in item.text
    assert item.find_element(By.CSS_SELECTOR, ".finding-trust").text == "claim"

    plain = panel("plain.png")
    assert plain.find_element(By.CSS_SELECTOR, ".provenance-badge").text == "nothing declared"
    assert plain.find_element(By.CSS_SELECTOR, ".provenance-summary").text == NOTHING_FOUND
    assert plain.find_elements(By.CSS_SELECTOR, ".finding") == []

    laughs = panel("laughs.jpg")
    error = laughs.find_element(By.CSS_SELECTOR, ".provenance-error")
    assert error.is_displayed() and "declares a DTD" in error.text
    assert cards["laughs.jpg"].find_element(By.CSS_SELECTOR, ".verdict").text in ("FAKE", "REAL")  # still scored

    shown = panel("hostile.png").find_element(By.CSS_SELECTOR, ".finding-text").text
    assert INJECTION in shown  # shown as text ...
    assert browser.find_elements(By.ID, "injected") == [] and browser.title != "pwned"  # ... never run as HTML
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("arguments[0].scrollIntoView()", cards["signed.jpg"])
    assert browser.save_screenshot(str(ARTIFACTS / "serve-page-provenance.png"))

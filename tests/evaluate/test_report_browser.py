"""The HTML report in a real browser: at 800 px the page never scrolls sideways, Table 1 scrolls in its box.

Needs ``chromium`` and ``chromium-driver`` (apt; ``.ci/run`` installs them) and selenium (the test
extra). The screenshot is kept as ``test-artifacts/report-narrow.png`` in the repository.
"""

from __future__ import annotations


import pytest

pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")


from tidy_detect.evaluate.report import build_report  # noqa: E402

from tests.evaluate.test_report_layout import write_results  # noqa: E402

from tests.browser import ARTIFACTS, MARKS, start_browser  # noqa: E402

pytestmark = MARKS


@pytest.fixture(scope="module")
def browser():
    driver = start_browser(800, 1000)
    yield driver
    driver.quit()


def test_narrow_window_scrolls_the_wide_table_not_the_page(browser, tmp_path):
    report = build_report([write_results(tmp_path, random=True)], tmp_path / "report.html")
    browser.set_window_size(800, 1000)
    browser.get(report.as_uri())
    inner = browser.execute_script("return window.innerWidth")
    assert inner <= 800
    page_width = browser.execute_script("return document.documentElement.scrollWidth")
    assert page_width <= inner, f"the page scrolls sideways: {page_width} px wide in a {inner} px window"
    boxes = browser.execute_script(
        "return [...document.querySelectorAll('.table-wrap')].map("
        "w => [w.scrollWidth, w.clientWidth, w.querySelector('table').rows[0].cells.length])")
    table1 = [b for b in boxes if b[2] == 18]  # detector, Table 1's 16 generators, Avg.
    assert table1, boxes
    scroll, client, _ = table1[0]
    assert scroll > client, f"Table 1 should scroll inside its box ({scroll} px in {client} px)"
    assert all(client <= inner for _, client, _ in boxes)
    # the banner is on screen at the top
    banner = browser.find_element("css selector", "div.random-weights")
    assert banner.is_displayed() and "Random weights" in banner.text
    assert browser.execute_script("return arguments[0].getBoundingClientRect().top", banner) < 300
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "report-narrow.png"))
    # a config block opened: nested key/value tables stay inside the page too
    browser.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
    assert browser.execute_script("return document.documentElement.scrollWidth") <= inner
    browser.execute_script("document.querySelector('details').scrollIntoView()")
    assert browser.save_screenshot(str(ARTIFACTS / "report-narrow-configs.png"))

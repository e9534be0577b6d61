"""The report opened in a real browser (headless Chromium driven by selenium): no console errors, every
figure decodes to a non-empty image, and the arms table shows the numbers of summary.json. Needs Debian's
`chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver) and selenium (the test extra);
without them the tests are skipped, saying what is missing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from run_folders import add_deployment, make_demo_run

from vldistill.report import write_report

pytestmark = pytest.mark.slow

ARMS_KEYS = ("acc1", "image_retrieval_recall@1", "text_retrieval_recall@1")
INSTALL = "apt-get install -y chromium chromium-driver"


def chromium_paths() -> tuple[str, str]:
    """The Chromium binary and its driver; skips the test, naming what is missing, when either is absent."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if path is None]
    if missing:
        pytest.skip(f"browser test needs {' and '.join(missing)} on PATH ({INSTALL})")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium session with the console log captured at every level."""
    binary, driver_path = chromium_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("browser test needs selenium (pip install 'vldistill[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,1024"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> list[dict]:
    """Load a file; the SEVERE console messages it produced."""
    driver.get(path.resolve().as_uri())
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def image_states(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
        "width: i.naturalWidth, height: i.naturalHeight}));"
    )


def test_checks_catch_a_console_error_and_a_broken_image(browser, tmp_path):
    """The checks below can fail: a console error and an undecodable image are seen."""
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><img alt="bad" src="data:image/png;base64,AAAA">'
                    '<script>console.error("deliberate")</script></body></html>')
    severe = open_page(browser, page)
    assert any("deliberate" in entry["message"] for entry in severe)
    assert [(image["alt"], image["width"]) for image in image_states(browser)] == [("bad", 0)]


def test_report_renders_cleanly_in_chromium(browser, tmp_path):
    run = add_deployment(make_demo_run(tmp_path / "demo"))
    out = tmp_path / "report.html"
    report = write_report([run], out)
    assert open_page(browser, out) == []
    images = image_states(browser)
    assert len(images) == report.figures == 7
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image["alt"]
    from selenium.webdriver.common.by import By

    summary = json.loads((run / "summary.json").read_text())
    rows = browser.find_elements(By.CSS_SELECTOR, "table#arms tbody tr")
    shown = {}
    for row in rows:
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        shown[cells[0]] = cells
    assert list(shown) == list(summary["models"])
    for name, figures in summary["models"].items():
        assert shown[name][1] == f"{figures['params']:,}"
        assert shown[name][2:5] == [f"{figures[key]:.3f}" for key in ARMS_KEYS]
        assert shown[name][5] == f"{figures['images_per_second']:,.0f}"
    kept = summary["student_retention_percent"]
    assert shown["student"][6:9] == [f"{kept[key]:.1f}" for key in ARMS_KEYS]
    headings = [h.text for h in browser.find_elements(By.TAG_NAME, "h2")]
    assert headings[0] == "Arms: teacher, distilled student and baselines" and len(headings) == len(report.sections)

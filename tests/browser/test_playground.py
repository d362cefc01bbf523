"""The playground and the API docs in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) against a real gateway process and worker: generate and watch the steps arrive, read a router's plan,
and the docs render with every host but this one unreachable."""

from __future__ import annotations

import shutil

import pytest

from tests.servicekit import WAIT, Worker, gateway_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with gateway_process(tmp_path_factory.mktemp("browser")) as (base, _, db, env):
        worker = Worker(env).start(db)
        try:
            yield base
        finally:
            worker.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # every host but loopback unreachable: the pages must need nothing from the internet
    offline = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", offline):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(lambda _: condition(), message=what)


def test_generate_in_the_playground_and_watch_the_steps(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(site + "/")
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#gen-router option"), "the built-in routers")
    Select(browser.find_element(By.ID, "gen-router")).select_by_value("builtin-digits-iepo-ddim-t20")
    assert browser.find_element(By.ID, "gen-steps").get_attribute("value") == "20"  # the router's own steps
    browser.find_element(By.ID, "gen-submit").click()
    wait_for(browser, lambda: "step" in browser.find_element(By.ID, "gen-status").text, "the first step")
    grid = browser.find_element(By.ID, "gen-grid")
    wait_for(browser, lambda: grid.get_attribute("naturalWidth") not in (None, "0"), "the image grid")
    assert browser.find_element(By.ID, "gen-steps-chart").get_attribute("data-steps") == "20"
    summary = browser.find_element(By.ID, "gen-summary").text
    assert "10 images" in summary and "theoretical speedup 2.07x" in summary
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_a_routers_plan_is_drawn_as_a_heatmap(site, browser):
    from selenium.webdriver.common.by import By

    browser.get(site + "/")
    browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=routers]").click()
    selector = "tr[data-router=builtin-digits-iepo-ddim-t20]"
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, selector), "the router table")[0].click()
    heatmap = browser.find_element(By.ID, "router-heatmap")
    wait_for(browser, lambda: heatmap.get_attribute("data-router") == "builtin-digits-iepo-ddim-t20", "the heatmap")
    assert heatmap.get_attribute("data-computed") == "112"  # of 20 steps x 12 branches, as its file records
    assert "20 steps (down) x 12 branches" in browser.find_element(By.ID, "heatmap-caption").text


def test_the_api_docs_render_with_the_internet_unreachable(site, browser):
    from selenium.webdriver.common.by import By

    browser.get(site + "/docs")
    operations = wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".opblock-summary"), "Swagger UI")
    assert any("/generate" in op.text for op in operations)
    browser.get(site + "/redoc")
    wait_for(browser, lambda: "Generate images" in browser.find_element(By.TAG_NAME, "body").text, "ReDoc")

"""The README's playground screenshots, taken the way tests/browser drives the page: a gateway process, one worker,
headless Chromium. Needs Debian's chromium and chromium-driver.

    .venv/bin/python docs/screenshot.py     # writes docs/playground-generate.png and docs/playground-routers.png
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servicekit import WAIT, Worker, gateway_process

OUT = Path(__file__).parent


def main() -> int:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
        return 2
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as tmp, gateway_process(Path(tmp)) as (base, _, db, env):
        worker = Worker(env).start(db)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        wait = WebDriverWait(browser, WAIT, poll_frequency=0.1)
        try:
            browser.get(base + "/")
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gen-router option"))
            Select(browser.find_element(By.ID, "gen-router")).select_by_value("builtin-digits-iepo-ddim-t20")
            browser.find_element(By.ID, "gen-submit").click()
            wait.until(lambda b: b.find_element(By.ID, "gen-grid").get_attribute("naturalWidth") not in (None, "0"))
            browser.save_screenshot(str(OUT / "playground-generate.png"))
            browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=routers]").click()
            browser.find_element(By.CSS_SELECTOR, "tr[data-router=builtin-digits-iepo-ddim-t20]").click()
            wait.until(lambda b: b.find_element(By.ID, "router-heatmap").get_attribute("data-computed"))
            browser.save_screenshot(str(OUT / "playground-routers.png"))
        finally:
            browser.quit()
            worker.stop()
    print(f"wrote {OUT / 'playground-generate.png'} and {OUT / 'playground-routers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

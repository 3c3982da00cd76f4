"""The status page in a real headless Chromium against ``twistd -n llamad`` with two demo models and auth on:
it asks for the key, shows both models, loads and unloads one, follows a child's log, streams an answer in
the playground, and shows markup from outside (an alias) as text, with no script run.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make setup`` installs them as root) and ``selenium``
(the test extras).  ``LLAMAD_UI_SCREENSHOT=<path>`` also saves the screenshot there (how
``docs/status-page.png`` is made); it always goes to the test's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from helpers import wait_for

pytestmark = pytest.mark.integration

CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("no headless browser: install Debian's chromium and chromium-driver (make setup does, as root)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed: pip install '.[test]'")

from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

OPS, READER = "ops-key-0123456789abcdef", "reader-key-0123456789abc"
MARKUP = ("<script>alert(1)</script>", "<img/src=x/onerror=alert(2)>")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1400", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def start(start_llamad, tmp_path: Path, demo_model: str):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.ops]\nkey = "{OPS}"\nrole = ["inference", "admin"]\ntokens_per_day = 100000\n\n'
                    f'[keys.reader]\nkey = "{READER}"\nmodels = ["one"]\n')
    aliases = json.dumps(list(MARKUP))
    toml = (f'[auth]\nenabled = true\nkeys_file = "{keys}"\n'
            f'[fleet]\nmemory_budget = "8GiB"\nmin_resident = 0\n'
            f'[models.one]\nmodel = "{demo_model}"\nmemory = "1GiB"\n'
            f'[models.two]\nmodel = "{demo_model}"\nmemory = "2GiB"\naliases = {aliases}\n')
    return start_llamad(toml=toml, wait="listening")


def text(driver, css: str) -> str:
    return str(driver.execute_script(f"return document.querySelector({json.dumps(css)}).textContent"))


def state_shown(driver, model: str) -> str:
    return str(driver.execute_script(
        "const row = Array.from(document.querySelectorAll('#models tbody tr'))"
        ".find((tr) => tr.dataset.model === arguments[0]);"
        "return row ? row.querySelector('.state').textContent : '';", model))


def button(driver, model: str, label: str):
    row = driver.find_element(By.CSS_SELECTOR, f'#models tbody tr[data-model="{model}"]')
    return next(b for b in row.find_elements(By.TAG_NAME, "button") if b.text == label)


def until(driver, predicate, what: str, timeout: float = 60) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: predicate(d), what)


def test_the_status_page_in_a_browser(start_llamad, tmp_path, demo_model, browser):
    daemon = start(start_llamad, tmp_path, demo_model)
    driver = browser
    driver.get(daemon.base_url + "/ui/")

    # It asks for the key; a key without the admin role is refused, the admin key lets it in.
    until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the key form")
    assert "asks for an API key" in text(driver, "#login-why")
    assert not driver.find_element(By.ID, "main").is_displayed()
    driver.find_element(By.ID, "key").send_keys(READER + "\n")
    until(driver, lambda d: "admin role" in text(d, "#login-why") and "reader" in text(d, "#login-why"),
          "the refusal of a key without the admin role")
    driver.find_element(By.ID, "key").send_keys(OPS + "\n")
    until(driver, lambda d: d.find_element(By.ID, "main").is_displayed(), "the page after the key")
    assert driver.execute_script("return sessionStorage.getItem('llamad.key')") == OPS
    assert driver.execute_script("return document.cookie") == ""

    # Both models, unloaded: the page's polling wakes neither.
    until(driver, lambda d: state_shown(d, "one") == "stopped" and state_shown(d, "two") == "stopped", "two models")
    assert "budget" in text(driver, "#memory-text") and "8.0 GiB" in text(driver, "#memory-text")
    time.sleep(4.5)  # two more polls
    assert {m: e["state"] for m, e in daemon.health()["models"].items()} == {"one": "stopped", "two": "stopped"}

    # Markup from outside (an alias) is text: shown as written, and nothing of it ran.
    aliases = text(driver, '#models tr[data-model="two"] .aliases')
    assert aliases == "also: " + ", ".join(MARKUP)
    assert driver.execute_script("return document.querySelectorAll('#models img, #models script').length") == 0
    assert driver.execute_script("return document.scripts.length") == 1

    # The log panel on model one, then a load: the child's new lines arrive.
    Select(driver.find_element(By.ID, "log-model")).select_by_value("one")
    time.sleep(2.5)
    assert text(driver, "#log") == ""  # no child has run yet
    button(driver, "one", "Load").click()
    until(driver, lambda d: state_shown(d, "one") == "ready", "model one loaded", 120)
    assert text(driver, "#action-result") == "load one: ok"
    log_file = daemon.data_dir / "logs" / "llama" / "one" / "latest.txt"
    last = wait_for(lambda: log_file.exists() and log_file.read_text().splitlines()[-1:], 30, "the child's log")[0]
    until(driver, lambda d: last.split(" ", 1)[-1] in text(d, "#log"), "the child's line on the page")

    # The playground streams an answer from model one; its child logs the request.
    driver.find_element(By.ID, "log-clear").click()
    assert text(driver, "#log") == ""
    Select(driver.find_element(By.ID, "play-model")).select_by_value("one")
    message = driver.find_element(By.ID, "play-message")
    message.clear()
    message.send_keys("Hello")
    driver.find_element(By.ID, "play-max").clear()
    driver.find_element(By.ID, "play-max").send_keys("24")
    driver.find_element(By.ID, "play-send").click()
    until(driver, lambda d: text(d, "#play-status") == "done" or text(d, "#play-status").startswith("error"),
          "the streamed answer", 120)
    assert text(driver, "#play-status") == "done" and text(driver, "#play-answer").strip()
    until(driver, lambda d: text(d, "#log").strip(), "the child's lines of the request")

    # Recent requests and keys: the chat request with its key and tokens; the keys without secrets.
    until(driver, lambda d: "/v1/chat/completions" in text(d, "#requests tbody"), "the request in the list")
    row = driver.execute_script(
        "return Array.from(document.querySelectorAll('#requests tbody tr'))"
        ".map((tr) => Array.from(tr.cells, (td) => td.textContent))"
        ".find((cells) => cells[3] === '/v1/chat/completions');")
    assert row[1:5] == ["ops", "one", "/v1/chat/completions", "200"] and int(row[6]) > 0
    until(driver, lambda d: " of 100000 tokens today" in text(d, "#keys tbody"), "the quota used")
    keys = text(driver, "#keys tbody")
    assert "reader" in keys and "no token quota" in keys
    assert OPS not in driver.page_source and READER not in driver.page_source

    # Load and unload of the other model change the state shown; restart is offered to a model with a child.
    assert button(driver, "two", "Restart").get_attribute("disabled")
    button(driver, "two", "Load").click()
    until(driver, lambda d: state_shown(d, "two") == "ready", "model two loaded", 120)
    assert not button(driver, "two", "Restart").get_attribute("disabled")
    button(driver, "two", "Unload").click()
    until(driver, lambda d: state_shown(d, "two") == "stopped", "model two unloaded", 60)
    assert text(driver, "#action-result") == "unload two: ok"
    assert button(driver, "two", "Restart").get_attribute("disabled")
    until(driver, lambda d: "/models/unload" in text(d, "#requests tbody"), "the unload in the list")

    screenshot = tmp_path / "status-page.png"
    driver.save_screenshot(str(screenshot))
    if os.environ.get("LLAMAD_UI_SCREENSHOT"):
        assert "pytest-of" not in text(driver, "body")  # no path of the machine that made it
        shutil.copyfile(screenshot, os.environ["LLAMAD_UI_SCREENSHOT"])

    # No alert ever opened, and the console has no CSP violation or script error.
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    problems = [entry["message"] for entry in driver.get_log("browser")
                if entry["level"] == "SEVERE" and "/favicon" not in entry["message"]
                and "status of 40" not in entry["message"]]  # refused keys (401, 403) are expected
    assert problems == []

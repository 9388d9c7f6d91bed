"""The web page end to end: headless Chromium (Selenium) typing into the page served by uvicorn."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'charnn[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install 'charnn[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

TYPED = "The interpreter reads a li"


@pytest.fixture(scope="module")
def server(tiny_run):
    """uvicorn serving the tiny model on 127.0.0.1 at an ephemeral port, in a thread."""
    import uvicorn

    from charnn.serving import create_app

    app = create_app(tiny_run, max_generate_chars=500)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield app, f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(predicate, timeout: float = 30.0, what: str = "the page"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def shown_suggestions(driver, for_text: str):
    """The suggestions the page shows once they are for ``for_text`` (None until then)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "suggestions")
    if box.get_attribute("data-text") != for_text:
        return None
    return [li.get_attribute("data-text") for li in box.find_elements(By.TAG_NAME, "li")] or None


def test_typing_shows_the_engines_suggestions_and_tab_accepts_the_first(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    browser.get(url + "/")
    wait_for(lambda: "parameters" in browser.find_element(By.ID, "model-info").text, what="the model information")
    editor = browser.find_element(By.ID, "editor")
    editor.send_keys(TYPED)
    shown = wait_for(lambda: shown_suggestions(browser, TYPED), what="suggestions for the typed text")
    assert shown == [s.text for s in app.state.completer.suggest(TYPED, k=3)]

    editor.send_keys(Keys.TAB)
    accepted = TYPED + shown[0]
    wait_for(lambda: editor.get_attribute("value") == accepted, what="Tab to insert the first suggestion")
    assert browser.switch_to.active_element == editor  # Tab did not move the focus away
    after = wait_for(lambda: shown_suggestions(browser, accepted), what="suggestions after accepting")
    assert after == [s.text for s in app.state.completer.suggest(accepted, k=3)]


def test_tab_pressed_before_the_suggestions_arrive_waits_for_them(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    app, url = server
    browser.get(url + "/")
    editor = browser.find_element(By.ID, "editor")
    editor.send_keys(TYPED + Keys.TAB)  # no time for the request of the last keystroke to come back
    accepted = TYPED + app.state.completer.suggest(TYPED, k=3)[0].text
    wait_for(lambda: editor.get_attribute("value") == accepted, what="Tab to insert the fresh first suggestion")
    assert browser.switch_to.active_element == editor


def test_line_mode_and_clicking_a_suggestion(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    app, url = server
    browser.get(url + "/")
    editor = browser.find_element(By.ID, "editor")
    editor.send_keys("A line of")
    Select(browser.find_element(By.ID, "mode")).select_by_value("line")
    expected = [s.text for s in app.state.completer.suggest("A line of", k=3, mode="line")]
    wait_for(lambda: shown_suggestions(browser, "A line of") == expected, what="line-mode suggestions")
    browser.find_elements(By.CSS_SELECTOR, "#suggestions li")[-1].click()
    wait_for(lambda: editor.get_attribute("value") == "A line of" + expected[-1], what="a click to accept")


def test_generate_box_streams_text_at_the_sliders_temperature(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _, url = server
    browser.get(url + "/")
    slider = browser.find_element(By.ID, "temperature")
    for _ in range(3):  # keyboard steps of 0.05 from 0.80
        slider.send_keys(Keys.ARROW_LEFT)
    wait_for(lambda: browser.find_element(By.ID, "temperature-value").text != "0.80", what="the slider")
    shown_t = float(browser.find_element(By.ID, "temperature-value").text)
    browser.find_element(By.ID, "seed").send_keys("The ")
    length = browser.find_element(By.ID, "length")
    length.clear()
    length.send_keys("60")
    browser.find_element(By.ID, "generate").click()
    out = browser.find_element(By.ID, "generated")
    wait_for(lambda: out.get_attribute("data-state") in ("done", "error"), what="the generation to finish")
    assert out.get_attribute("data-state") == "done", out.text
    assert shown_t == pytest.approx(0.65) and float(out.get_attribute("data-temperature")) == pytest.approx(0.65)
    assert len(browser.execute_script("return document.getElementById('generated').textContent")) == 60

"""The service's web page in a real headless Chromium driven by selenium, against the real Serve
application (tiny model, toy index, an API key): what a person sees is checked in the browser,
not only that the HTML is served.

Needs the ``chromium`` and ``chromedriver`` binaries (Debian: ``apt-get install chromium
chromium-driver``) and skips without them. ``RAG_RAY_SCREENSHOT=1`` also saves the answered page
to docs/serving-page.png (off by default, so test runs never rewrite the docs).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[test]')")

from conftest import TOY_QUESTIONS, http, start_tiny_service
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                                reason="needs the chromium and chromedriver binaries "
                                       "(Debian: apt-get install chromium chromium-driver)")

KEY = "test-key-0123456789"  # the key conftest.http() (and so start_tiny_service's health check) sends
QUESTION = TOY_QUESTIONS[3]["question"]  # Who created the Python programming language?
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serving-page.png"


@pytest.fixture(scope="module")
def service(ray_local, toy_corpus, tmp_path_factory):
    """The app behind an API key ($RAG_RAY_API_KEY is read when the app is built), one replica."""
    from ray import serve

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAG_RAY_API_KEY", KEY)
        yield start_tiny_service(tmp_path_factory.mktemp("page"), toy_corpus,
                                 {"autoscaling": {"min_replicas": 1, "max_replicas": 1, "replica_cpus": 0.25}})
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module (one tab, so sessionStorage carries between tests)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # no Selenium Manager download
    yield driver
    driver.quit()


def _by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def _wait(driver, condition, seconds: float = 60.0):
    return WebDriverWait(driver, seconds).until(condition)


def _ask(driver, question: str, key: str | None = None, n_docs: str | None = None) -> None:
    """Fill the form like a person (key, question, passages) and click Ask; returns once the page
    shows either an answer or an error."""
    if key is not None:
        _by_id(driver, "api-key").clear()
        _by_id(driver, "api-key").send_keys(key)
    if n_docs is not None:
        _by_id(driver, "n-docs").clear()
        _by_id(driver, "n-docs").send_keys(n_docs)
    _by_id(driver, "question").clear()
    _by_id(driver, "question").send_keys(question)
    _by_id(driver, "ask").click()
    _wait(driver, lambda d: _by_id(d, "ask").is_enabled()
          and (_by_id(d, "result").is_displayed() or _by_id(d, "error").is_displayed()))


def test_page_asks_with_the_key_and_shows_answer_passages_and_index(service, browser):
    url = service["url"]
    browser.get(url + "/")
    assert "/v1/answer" in browser.page_source
    # Without a key, GET /v1/index on load answers 401: the page says so instead of a version.
    _wait(browser, lambda d: "enter the API key" in _by_id(d, "index-text").text)

    _by_id(browser, "api-key").send_keys(KEY)
    _by_id(browser, "question").click()  # leaving the key field stores it and reloads the index
    _wait(browser, lambda d: "9 passages in 2 shards" in _by_id(d, "index-text").text)
    assert _by_id(browser, "index-version").text == "index/v0001"

    _ask(browser, QUESTION)
    assert not _by_id(browser, "error").is_displayed(), _by_id(browser, "error").text
    status, reply, _ = http(url + "/v1/answer", {"question": QUESTION}, key=KEY)
    assert status == 200, reply
    shown = _by_id(browser, "answer").get_attribute("textContent")
    assert shown == (reply["answer"] or "(empty answer)")  # greedy decoding: the same answer twice
    assert _by_id(browser, "answer-version").text == "index/v0001"
    assert float(_by_id(browser, "answer-score").text) == pytest.approx(reply["score"], abs=1e-3)

    passages = browser.find_elements(By.CSS_SELECTOR, "#passages .passage")
    assert len(passages) == len(reply["passages"]) >= 1
    for element, passage in zip(passages, reply["passages"]):
        assert element.find_element(By.CLASS_NAME, "passage-title").text == passage["title"]
        assert element.find_element(By.CLASS_NAME, "passage-text").get_attribute("textContent") == passage["text"]
        width = re.fullmatch(r"width: ([\d.]+)%;", element.find_element(By.CLASS_NAME, "bar-fill").get_attribute("style"))
        assert float(width.group(1)) == pytest.approx(passage["posterior"] * 100, abs=0.05)
        assert element.find_element(By.CLASS_NAME, "posterior-value").text == f"{passage['posterior'] * 100:.1f}%"
    assert not [e for e in browser.get_log("browser") if "Uncaught" in e["message"]]

    if os.environ.get("RAG_RAY_SCREENSHOT") == "1":
        # the whole page at once: a headless window cannot grow past its virtual screen, the viewport can
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1100, "height": height, "deviceScaleFactor": 1, "mobile": False})
        browser.save_screenshot(str(SCREENSHOT))
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_page_shows_server_errors(service, browser):
    browser.get(service["url"] + "/")
    assert _by_id(browser, "api-key").get_attribute("value") == KEY  # kept in sessionStorage across loads

    _ask(browser, QUESTION, key="wrong-key")
    error = _by_id(browser, "error")
    assert error.is_displayed() and "Error 401" in error.text and "wrong API key" in error.text
    assert not _by_id(browser, "result").is_displayed()  # no stale answer under the error

    _ask(browser, QUESTION, key=KEY, n_docs="999")  # over limits.max_n_docs: 422 naming the field
    assert error.is_displayed() and "Error 422" in error.text and "n_docs" in error.text

    _ask(browser, QUESTION, n_docs="1")
    assert not error.is_displayed() and len(browser.find_elements(By.CSS_SELECTOR, "#passages .passage")) == 1


def test_passage_text_is_never_markup_and_answer_is_marked(service, browser):
    """The answer span is found case-insensitively and marked; text that looks like HTML (or a
    regex) stays text."""
    browser.get(service["url"] + "/")
    html = browser.execute_script(
        "const p = document.createElement('p');"
        "p.append(markAnswer(arguments[0], arguments[1]));"
        "return [p.innerHTML, p.querySelectorAll('mark').length, p.querySelectorAll('img').length];",
        '<img src=x onerror="window.pwned=1"> guido van Rossum (1.0) and GUIDO VAN ROSSUM', "Guido van Rossum")
    escaped = ('&lt;img src=x onerror="window.pwned=1"&gt; <mark>guido van Rossum</mark> (1.0) and '
               '<mark>GUIDO VAN ROSSUM</mark>')
    assert html == [escaped, 2, 0]
    assert browser.execute_script("return markAnswer('a (1.0) b a (1x0)', '(1.0)').childNodes.length") == 3

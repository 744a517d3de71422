"""The dashboard's language-model panel in headless Chromium: a question goes to POST /v1/chat/completions with
``stream: true`` and the answer appears token by token, with each token's bits and latency charted.

First against the scripted stub device (tests/llm_stub.py), which streams slowly and fails on demand, so
the page's SSE parsing, figures and error display are checked exactly; then against the real testbed, where
the split model must answer the scene question with the right colour.

Needs Chromium and chromedriver, as tests/device/test_dashboard_chromium.py (whose browser and helpers
this module reuses); skips without them.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import pytest

from conftest import Testbed, free_port
from llm_stub import BITS_PER_TOKEN, MODEL_ID, StubDevice, serve_stub
from test_dashboard_chromium import (  # noqa: F401  (browser: a fixture, used by name)
    CHROMEDRIVER, CHROMIUM, browser, data, number, painted_pixels, set_input, text, wait_for)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")

QUESTION = "Scene: a red circle, a blue square.\nQuestion: what colour is the square?"
FIGURE_IDS = ("llm-bits-per-token", "llm-first-bits", "llm-tokens", "llm-ttft", "llm-tpot", "llm-bits",
              "llm-symbols", "llm-airtime", "llm-codec-out", "llm-channel-out", "llm-finish")
# Records every text the answer box shows, so a test can tell a streamed answer from one set all at once.
RECORD_ANSWER = """
    window.answerSnapshots = [];
    const box = document.getElementById('llm-answer');
    new MutationObserver(() => window.answerSnapshots.push(box.textContent))
        .observe(box, {childList: true, subtree: true, characterData: true});"""


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[StubDevice, str]]:
    port = free_port()
    with serve_stub(port) as device:
        yield device, f"http://127.0.0.1:{port}"


def open_dashboard(driver: Any, url: str) -> None:
    driver.get_log("browser")  # drop what earlier tests logged (a refused request is logged as SEVERE)
    driver.get(url + "/")
    wait_for(driver, lambda d: d.execute_script("return document.body.dataset.llmReady") == "true", 60,
             "the language model's catalogue (GET /v1/models, /v1/codecs?source=llm-hidden)")


def ask(driver: Any, question: str) -> None:
    set_input(driver, "llm-prompt", question)
    driver.execute_script(RECORD_ANSWER)
    driver.find_element("id", "llm-send").click()


def wait_answered(driver: Any, timeout: float) -> str:
    """Wait until the answer is finished or failed; return the panel's state ("done", "error", ...)."""
    return wait_for(driver, lambda d: d.execute_script(
        "const s = document.body.dataset.llmState; return s && s !== 'streaming' ? s : false"), timeout,
        "the streamed answer to finish")


def llm_error(driver: Any) -> str:
    return str(driver.execute_script("return document.getElementById('llm-error').textContent"))


def test_llm_panel_streams_the_answer_with_per_token_figures(browser: Any, stub: tuple[StubDevice, str]) -> None:
    from selenium.webdriver.support.ui import Select

    device, url = stub
    open_dashboard(browser, url)
    assert [o.text for o in Select(browser.find_element("id", "llm-codec")).options] == ["raw-fp16", "analog"]
    # Split points 1..N of the model's 4 layers (the API's range), its default chosen.
    split = Select(browser.find_element("id", "llm-split"))
    assert [o.text for o in split.options] == ["1", "2", "3", "4"] and split.first_selected_option.text == "2"
    # The link controls follow codec and channel: modulation and FEC for digital payloads on a modelled link.
    Select(browser.find_element("id", "llm-codec")).select_by_value("analog")
    assert not browser.find_element("id", "llm-modulation").is_enabled()
    Select(browser.find_element("id", "llm-codec")).select_by_value("raw-fp16")
    Select(browser.find_element("id", "llm-channel")).select_by_value("ideal")
    assert not browser.find_element("id", "llm-snr").is_enabled()
    Select(browser.find_element("id", "llm-channel")).select_by_value("awgn")
    assert browser.find_element("id", "llm-modulation").is_enabled()
    Select(browser.find_element("id", "llm-modulation")).select_by_value("qpsk")
    set_input(browser, "llm-snr", "12")
    split.select_by_value("3")
    set_input(browser, "llm-max-tokens", "6")
    set_input(browser, "llm-seed", "5")

    ask(browser, QUESTION)
    assert wait_answered(browser, 30) == "done", llm_error(browser)

    body = device.requests[-1]
    assert body["model"] == MODEL_ID and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": QUESTION}]
    assert body["channel"] == {"model": "awgn", "snr_db": 12, "modulation": "qpsk", "fec": "none"}
    assert (body["codec"], body["split_layer"], body["max_tokens"], body["temperature"], body["seed"]) == \
        ("raw-fp16", 3, 6, 0, 5)

    # Token by token: the box showed the first token alone before the whole answer.
    assert browser.execute_script("return window.answerSnapshots") == [" bl", " blue"]
    assert browser.execute_script("return document.getElementById('llm-answer').textContent") == " blue"
    spans = browser.execute_script("""return [...document.querySelectorAll('#llm-answer .tok')]
        .map(s => [s.textContent, s.title]);""")
    assert [s[0] for s in spans] == [" bl", "ue"]
    assert spans[0][1].startswith(f"token 0: {BITS_PER_TOKEN:,} bits, 1,024 channel uses, ")

    assert text(browser, "llm-bits-per-token") == f"{BITS_PER_TOKEN:,} bits"
    assert text(browser, "llm-tokens") == "2 (prompt 12)"
    assert number(text(browser, "llm-ttft")) > 100  # the stub waits 150 ms before each token
    assert number(text(browser, "llm-bits")) == 2 * BITS_PER_TOKEN
    assert number(text(browser, "llm-symbols")) == 2048
    assert math.isclose(number(text(browser, "llm-airtime")), 1.0)
    assert text(browser, "llm-codec-out") == "raw-fp16 · layer 3"
    assert text(browser, "llm-channel-out") == "awgn @ 12.0 dB"
    assert text(browser, "llm-finish") == "stop"
    for chart in ("llm-chart-latency", "llm-chart-bits"):
        assert data(browser, chart, "points") == "2"
        assert painted_pixels(browser, chart) > 1500, f"{chart} looks empty"
    assert not browser.find_element("id", "llm-error").is_displayed()
    assert browser.find_element("id", "llm-send").is_enabled()
    # The image panel is untouched by the LLM panel.
    assert browser.execute_script("return document.body.dataset.ready") == "true"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_llm_panel_shows_an_error_that_arrives_mid_stream(browser: Any, stub: tuple[StubDevice, str]) -> None:
    _, url = stub
    open_dashboard(browser, url)
    ask(browser, QUESTION + " FAIL-MIDSTREAM")
    assert wait_answered(browser, 30) == "error"
    assert llm_error(browser) == "the channel emulator went away (upstream_unavailable, 503)"
    assert browser.execute_script("return document.getElementById('llm-answer').textContent") == " bl"
    assert data(browser, "llm-chart-latency", "points") == "1"
    assert browser.find_element("id", "llm-send").is_enabled()


def test_llm_panel_shows_a_rejected_request(browser: Any, stub: tuple[StubDevice, str]) -> None:
    _, url = stub
    open_dashboard(browser, url)
    ask(browser, "FAIL-BEFORE")
    assert wait_answered(browser, 30) == "error"
    assert llm_error(browser) == "HTTP 422: split_layer: must be in [1, 4]"
    assert browser.execute_script("return document.getElementById('llm-answer').textContent") == ""


def test_llm_panel_answers_the_scene_question_on_the_testbed(browser: Any, testbed: Testbed) -> None:
    from selenium.webdriver.support.ui import Select

    open_dashboard(browser, testbed.url)
    Select(browser.find_element("id", "llm-channel")).select_by_value("awgn")
    set_input(browser, "llm-snr", "30")
    set_input(browser, "llm-temperature", "0")
    ask(browser, QUESTION)
    state = wait_answered(browser, 240)
    assert state == "done", llm_error(browser)

    answer = browser.execute_script("return document.getElementById('llm-answer').textContent")
    assert answer.strip() == "blue", answer
    snapshots = browser.execute_script("return window.answerSnapshots")
    assert snapshots[-1] == answer and len(snapshots) >= 2  # it grew from empty, token by token
    tokens = int(text(browser, "llm-tokens").split()[0])
    assert tokens >= 1
    for figure in FIGURE_IDS[:2] + FIGURE_IDS[3:]:
        assert text(browser, figure), f"{figure} is empty"
    assert number(text(browser, "llm-bits-per-token")) > 0
    assert number(text(browser, "llm-ttft")) > 0
    for chart in ("llm-chart-latency", "llm-chart-bits"):
        assert data(browser, chart, "points") == str(tokens)
        assert painted_pixels(browser, chart) > 1500, f"{chart} looks empty"
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []

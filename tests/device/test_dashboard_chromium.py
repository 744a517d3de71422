"""The device's built-in dashboard (GET /) driven in headless Chromium against a real testbed.

Needs Chromium and its WebDriver (Debian: ``apt-get install chromium chromium-driver``; .ci/run installs them);
the tests skip without them. Selenium talks to the system chromedriver only: Selenium Manager is never asked to
download anything.

Set MEG_UPDATE_SCREENSHOTS=1 to refresh docs/dashboard.png (otherwise the screenshot goes to a temp folder, so
a test run leaves the tree clean).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from PIL import Image

from conftest import REPO, Testbed, free_port

PROMPT = "a red circle on a white background"
SCREENSHOT_SIZE = (1400, 1000)
CHART_IDS = ("chart-latency", "chart-symbols", "chart-quality")
CHART_MAX_REQUESTS = 40  # app.js: charts show the last 40 requests of /v1/history


def _first_file(*candidates: str | None) -> str | None:
    return next((c for c in candidates if c and Path(c).is_file()), None)


# Debian's /usr/bin/chromium is a shell wrapper; chromedriver wants the browser binary itself.
CHROMIUM = _first_file("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                       shutil.which("google-chrome"))
CHROMEDRIVER = _first_file(shutil.which("chromedriver"), "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must never go to the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--window-size={SCREENSHOT_SIZE[0]},{SCREENSHOT_SIZE[1]}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # The viewport itself at the screenshot size (the window size includes no browser chrome in headless mode,
    # but set it exactly so the committed screenshot does not depend on Chromium's version).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": SCREENSHOT_SIZE[0], "height": SCREENSHOT_SIZE[1], "deviceScaleFactor": 1, "mobile": False})
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, condition: Callable[[Any], Any], timeout: float, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        console = "\n".join(str(e) for e in driver.get_log("browser"))
        error = driver.execute_script("const e = document.getElementById('error'); return e ? e.textContent : ''")
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; page error: {error!r}; "
                             f"console:\n{console}") from None


def text(driver: Any, element_id: str) -> str:
    return driver.find_element("id", element_id).text.strip()


def number(shown: str) -> float:
    """The leading number of a cell such as ``"8,064"`` or ``"11.48 dB"``."""
    return float(shown.split()[0].replace(",", ""))


def set_input(driver: Any, element_id: str, value: str) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(value)


def painted_pixels(driver: Any, canvas_id: str) -> int:
    """How many pixels of a canvas are not transparent: drawn charts have axes, text and marks."""
    return int(driver.execute_script("""
        const c = document.getElementById(arguments[0]);
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
        return n;""", canvas_id))


def post(testbed: Testbed, codec: str, channel: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(f"{testbed.url}/v1/generate", timeout=120, json={
        "prompt": PROMPT, "seed": 3, "steps": 4, "codec": codec, "channel": channel, "reference": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def device_total(testbed: Testbed, metric: str) -> float:
    """The total of a device counter over its label sets, as the dashboard adds it up."""
    text = httpx.get(f"{testbed.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(metric) and line[len(metric)] in "{ ")


def data(driver: Any, element_id: str, key: str) -> str | None:
    return driver.execute_script("return document.getElementById(arguments[0]).dataset[arguments[1]]",
                                 element_id, key)


def test_dashboard_generates_and_charts_match_the_api(browser: Any, testbed: Testbed, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    # A few requests at different SNRs first, so the charts have points to draw.
    for codec, channel in [("analog", {"model": "awgn", "snr_db": 0}), ("analog", {"model": "awgn", "snr_db": 10}),
                           ("analog", {"model": "awgn", "snr_db": 20}), ("raw-fp16", {"model": "ideal"})]:
        post(testbed, codec, channel)

    browser.get(testbed.url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true", 30,
             "codecs and channels to load")
    # The history holds requests: the newest is shown at once, not "No request yet."
    assert not browser.find_element("id", "result-empty").is_displayed()
    assert data(browser, "result", "restored") == "true"
    shown_before = data(browser, "result-image", "id")
    # More traffic while the page samples the device's counters: the throughput chart shows it as a rate.
    post(testbed, "jscc", {"model": "awgn", "snr_db": 5})
    post(testbed, "hyperprior", {"model": "awgn", "snr_db": 5, "fec": "ldpc"})
    codecs = httpx.get(f"{testbed.url}/v1/codecs", timeout=10).json()
    channels = httpx.get(f"{testbed.url}/v1/channels", timeout=10).json()
    assert [o.text for o in Select(browser.find_element("id", "codec")).options] == \
        [c["name"] for c in codecs["codecs"]]
    assert [o.text for o in Select(browser.find_element("id", "channel")).options] == \
        [c["name"] for c in channels["channels"]]
    # An ideal channel has no SNR, modulation or FEC to set; an analog codec no modulation or FEC.
    Select(browser.find_element("id", "channel")).select_by_value("ideal")
    assert not browser.find_element("id", "snr").is_enabled()
    assert not browser.find_element("id", "modulation").is_enabled()
    assert browser.find_element("id", "bandwidth").is_enabled() and browser.find_element("id", "delay").is_enabled()
    Select(browser.find_element("id", "channel")).select_by_value("awgn")
    Select(browser.find_element("id", "codec")).select_by_value("analog")
    assert not browser.find_element("id", "fec").is_enabled()
    assert not browser.find_element("id", "modulation").is_enabled()

    Select(browser.find_element("id", "codec")).select_by_value("uint8")
    assert browser.find_element("id", "fec").is_enabled() and not browser.find_element("id", "code-rate").is_enabled()
    Select(browser.find_element("id", "fec")).select_by_value("ldpc")
    assert browser.find_element("id", "code-rate").is_enabled()
    Select(browser.find_element("id", "code-rate")).select_by_visible_text("1/2")
    Select(browser.find_element("id", "modulation")).select_by_value("16qam")
    set_input(browser, "bandwidth", "2000000")
    set_input(browser, "delay", "5")
    set_input(browser, "prompt", PROMPT)
    set_input(browser, "snr", "12")
    set_input(browser, "seed", "7")
    set_input(browser, "steps", "8")
    set_input(browser, "guidance", "4")
    if not browser.find_element("id", "reference").is_selected():
        browser.find_element("id", "reference").click()
    browser.find_element("id", "submit").click()

    image_id = wait_for(browser, lambda d: d.execute_script("""
        const img = document.getElementById('result-image');
        return img.complete && img.naturalWidth > 0 && img.dataset.id !== arguments[0] ? img.dataset.id : false;""",
        shown_before), 180, "the generated image")
    assert data(browser, "result", "restored") == "false"

    history = httpx.get(f"{testbed.url}/v1/history", timeout=10).json()["requests"]
    (out,) = [r for r in history if r["id"] == image_id]
    assert out["prompt"] == PROMPT and out["codec"] == "uint8" and out["channel"]["model"] == "awgn"
    assert out["snr_db"] == 12 and out["seed"] == 7 and out["steps"] == 8 and out["guidance_scale"] == 4
    # The link controls reached the channel emulator (it echoes what it applied).
    link = out["channel"]
    assert (link["bandwidth_hz"], link["delay_ms"], link["modulation"], link["fec"]) == (2e6, 5, "16qam", "ldpc")
    assert browser.execute_script("return document.getElementById('result-image').naturalWidth") == out["width"]

    # The numbers shown are the API's.
    assert text(browser, "out-codec") == "uint8"
    assert text(browser, "out-channel") == "awgn @ 12.0 dB"
    assert text(browser, "out-link") == "2M symbols/s · delay 5 ms · 16qam + LDPC"
    assert number(text(browser, "out-bits")) == out["bits_sent"]
    assert number(text(browser, "out-symbols")) == out["symbols_sent"]
    assert math.isclose(number(text(browser, "out-airtime")), out["airtime_ms"], abs_tol=5e-4)
    assert number(text(browser, "out-bit-errors")) == out["bit_errors"]
    assert "psnr_db" in out["quality"]
    assert math.isclose(number(text(browser, "out-psnr")), out["quality"]["psnr_db"], abs_tol=5e-3)
    assert math.isclose(number(text(browser, "out-msssim")), out["quality"]["ms_ssim"], abs_tol=5e-5)
    assert math.isclose(number(text(browser, "out-total")), out["timings_ms"]["total"], abs_tol=0.05)
    # The latency bar: one segment a stage, together the whole request.
    widths = browser.execute_script("""
        return [...document.querySelectorAll('#breakdown div')].map(d => [d.dataset.stage, parseFloat(d.style.width)]);""")
    assert [stage for stage, _ in widths] == ["edge", "encode", "channel", "decode", "other"]
    assert math.isclose(sum(w for _, w in widths), 100.0, abs_tol=0.5)
    edge_share = dict(widths)["edge"]
    assert math.isclose(edge_share, 100 * out["timings_ms"]["edge"] / out["timings_ms"]["total"], abs_tol=0.01)

    # The charts: one bar a recent request, one dot a request with a measured PSNR.
    recent = history[-CHART_MAX_REQUESTS:]
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.chartsDrawn") == str(len(recent)),
             30, "the charts to show the new request")
    points = {cid: browser.execute_script(f"return document.getElementById('{cid}').dataset.points")
              for cid in CHART_IDS}
    with_psnr = [r for r in recent if "psnr_db" in r.get("quality", {})]
    assert points == {"chart-latency": str(len(recent)), "chart-symbols": str(len(recent)),
                      "chart-quality": str(len(with_psnr))}
    assert len(with_psnr) >= 5
    for cid in CHART_IDS:
        assert painted_pixels(browser, cid) > 2000, f"{cid} looks empty"
    # Every request's channel uses are drawn, analog and JSCC ones too (they send symbols, not bits).
    assert all(r["symbols_sent"] > 0 for r in recent if r["codec"] in ("analog", "jscc"))

    # Throughput: the page adds up the device's counters as /metrics does, and saw traffic as a rate.
    totals = {"totalBits": 8 * device_total(testbed, "meg_request_payload_bytes_sum"),
              "totalSymbols": device_total(testbed, "meg_request_symbols_sum")}
    wait_for(browser, lambda d: all(float(data(d, "chart-rate", k) or "nan") == v for k, v in totals.items()), 30,
             f"the throughput chart to sample the device's counters {totals}")
    assert float(data(browser, "chart-rate", "maxBits")) > 0 and float(data(browser, "chart-rate", "maxSymbols")) > 0
    # A rate, not a running total: with no more traffic it falls back to zero once the window has passed.
    wait_for(browser, lambda d: data(d, "chart-rate", "nowBits") == "0" and data(d, "chart-rate", "nowSymbols") == "0",
             45, "the throughput to fall back to zero")
    assert painted_pixels(browser, "chart-rate") > 2000

    # Nothing failed in the page.
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []

    target = REPO / "docs" / "dashboard.png" if os.environ.get("MEG_UPDATE_SCREENSHOTS") else tmp_path / "dash.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(target))
    with Image.open(target) as shot:
        assert shot.size == SCREENSHOT_SIZE

    # A reload keeps the latest result (this browser's), the history charts and the throughput samples.
    rate_points = int(data(browser, "chart-rate", "points"))
    browser.refresh()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true", 30,
             "the page after a reload")
    assert not browser.find_element("id", "result-empty").is_displayed()
    assert data(browser, "result", "restored") == "true" and data(browser, "result-image", "id") == image_id
    assert text(browser, "out-codec") == "uint8" and number(text(browser, "out-bits")) == out["bits_sent"]
    assert browser.execute_script("return document.body.dataset.chartsDrawn") == str(len(recent))
    wait_for(browser, lambda d: int(data(d, "chart-rate", "points") or 0) >= rate_points, 30,
             "the throughput samples kept across the reload")


def test_dashboard_shows_the_detail_of_a_rejected_request(browser: Any, testbed: Testbed) -> None:
    browser.get(testbed.url + "/")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true", 30,
             "codecs and channels to load")
    set_input(browser, "prompt", "   ")  # passes the form's `required`, fails the API's "not blank" rule
    browser.find_element("id", "submit").click()
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), 30, "the error message")
    assert text(browser, "error") == "HTTP 422: prompt: prompt must not be blank"
    assert browser.find_element("id", "submit").is_enabled()


@pytest.fixture()
def keyed_device(testbed_model_dir: Path) -> Iterator[str]:
    """A device app that requires an API key, served in-process (no channel behind it: the key flow needs none)."""
    import uvicorn

    from device_client.app import DeviceConfig, create_app

    port = free_port()
    config = DeviceConfig(port=port, channel=f"127.0.0.1:{free_port()}", model_dir=testbed_model_dir,
                          api_keys=("dashboard-test-key",))
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "in-process device did not start"
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_dashboard_asks_for_the_api_key(browser: Any, keyed_device: str) -> None:
    from selenium.webdriver.support.ui import Select

    browser.get(keyed_device + "/")
    wait_for(browser, lambda d: d.find_element("id", "key-panel").is_displayed(), 30, "the API key prompt")
    assert "HTTP 401" in text(browser, "error")
    set_input(browser, "api-key", "dashboard-test-key")
    browser.find_element("css selector", "#key-form button[type=submit]").click()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true", 30,
             "codecs and channels to load with the key")
    assert not browser.find_element("id", "key-panel").is_displayed()
    assert len(Select(browser.find_element("id", "codec")).options) > 0
    assert browser.execute_script("return localStorage.getItem('meg.apiKey')") == "dashboard-test-key"
    # The key survives a reload: no prompt the second time.
    browser.refresh()
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.ready") == "true", 30,
             "the catalogue after a reload")
    assert not browser.find_element("id", "key-panel").is_displayed()

"""Fault injection on a real testbed: services killed mid-request and restarted, deadlines that expire.

Each scenario checks that the request caught in the fault ends with a clean JSON error (never a hang, a
reset connection or a 500), and that the testbed recovers by restarting only the service that died. The
scenarios share one private testbed (starting one costs tens of seconds on CPU); each leaves it healthy.
Timing is only checked against generous "within the deadline" bounds.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Testbed

#: The device's per-request deadline in this module: long enough for a short request on a loaded CPU,
#: short enough that the deadline scenario stays quick.
REQUEST_TIMEOUT_S = 15.0
#: How long past its deadline a faulted request may take to be answered.
ANSWER_SLACK_S = 20.0
PROMPT = "a blue square on a white background"
#: A request whose edge compute takes many seconds (the edge's maximum step count).
SLOW_AT_EDGE = {"prompt": PROMPT, "seed": 1, "steps": 200, "codec": "raw-fp16"}
#: A request that is quick at the edge but spends ~26 s on the air: 16384 BPSK symbols at the minimum
#: symbol rate (1 kHz) after the maximum propagation delay (10 s).
SLOW_ON_AIR = {"prompt": PROMPT, "seed": 2, "steps": 1, "codec": "raw-fp16",
               "channel": {"model": "ideal", "bandwidth_hz": 1e3, "delay_ms": 10_000, "modulation": "bpsk"}}
QUICK = {"prompt": PROMPT, "steps": 2, "codec": "raw-fp16"}


@pytest.fixture(scope="module")
def faulty_bed(testbed_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    bed = Testbed(testbed_model_dir, logs=tmp_path_factory.mktemp("fault_logs"),
                  device_args=["--request-timeout-s", str(REQUEST_TIMEOUT_S)])
    try:
        yield bed.up()
    finally:
        bed.down()


@pytest.fixture()
def bed(faulty_bed: Testbed) -> Testbed:
    """The module's testbed, with any service a failed scenario left dead started again."""
    for name in ("edge", "channel", "device"):
        if name not in faulty_bed.procs or faulty_bed.procs[name].poll() is not None:
            faulty_bed.start(name)
    faulty_bed.wait_healthy()
    return faulty_bed


def post(bed: Testbed, body: dict, timeout: float = REQUEST_TIMEOUT_S + ANSWER_SLACK_S) -> httpx.Response:
    return httpx.post(f"{bed.url}/v1/generate", json=body, timeout=timeout)


def in_flight(metrics_port: int, service: str) -> float:
    """The ``meg_requests_in_flight`` gauge a service exports (0 when it cannot be read)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2.0).text
    except httpx.HTTPError:
        return 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "meg_requests_in_flight":
            for sample in family.samples:
                if sample.labels.get("service") == service:
                    return sample.value
    return 0.0


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")


def assert_clean_error(resp: httpx.Response, statuses: set[int]) -> None:
    assert resp.status_code in statuses, f"{resp.status_code}: {resp.text[:300]}"
    assert resp.headers["content-type"].startswith("application/json")
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail


def device_healthy(bed: Testbed) -> bool:
    try:
        return httpx.get(f"{bed.url}/healthz", timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def restart(bed: Testbed, name: str) -> None:
    """Start ``name`` again once the device has noticed it is gone (the channel emulator polls the edge's
    health once a second, so /healthz may still say ok just after a kill), then wait for the testbed."""
    wait_until(lambda: not device_healthy(bed), 30, f"/healthz to report the {name} down")
    bed.start(name)
    bed.wait_healthy()


def assert_serves(bed: Testbed, n: int = 2) -> None:
    for seed in range(n):
        resp = post(bed, {**QUICK, "seed": 100 + seed})
        assert resp.status_code == 200, resp.text
        assert resp.json()["image_url"]


def kill_mid_request(bed: Testbed, victim: str, body: dict, metrics_port: int) -> httpx.Response:
    """Send ``body``, SIGKILL ``victim`` once the request is in flight there, return the answer."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, bed, body)
        wait_until(lambda: in_flight(metrics_port, victim) >= 1 or pending.done(), 60,
                   f"the request to reach the {victim}")
        assert not pending.done(), f"finished before the {victim} could be killed: {pending.result().text}"
        bed.stop(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        resp = pending.result(timeout=REQUEST_TIMEOUT_S + ANSWER_SLACK_S)
        assert time.monotonic() - killed_at < REQUEST_TIMEOUT_S + ANSWER_SLACK_S
    return resp


@pytest.mark.timeout(300)
def test_edge_killed_mid_request_then_restarted(bed: Testbed) -> None:
    survivors = {name: bed.procs[name].pid for name in ("channel", "device")}
    resp = kill_mid_request(bed, "edge", SLOW_AT_EDGE, bed.edge_metrics_port)
    assert_clean_error(resp, {502, 503})
    assert "edge" in resp.json()["detail"]
    # While the edge is down the device says which hop failed, rather than hanging.
    down = post(bed, {**QUICK, "seed": 5})
    assert_clean_error(down, {502, 503})

    restart(bed, "edge")  # same port; channel and device keep running
    assert_serves(bed)
    assert {name: bed.procs[name].pid for name in survivors} == survivors
    assert all(bed.procs[name].poll() is None for name in survivors)


@pytest.mark.timeout(300)
def test_channel_killed_mid_request_then_restarted(bed: Testbed) -> None:
    survivors = {name: bed.procs[name].pid for name in ("edge", "device")}
    resp = kill_mid_request(bed, "channel", SLOW_ON_AIR, bed.channel_metrics_port)
    assert_clean_error(resp, {502, 503})
    down = post(bed, {**QUICK, "seed": 6})
    assert_clean_error(down, {502, 503})
    assert "channel emulator" in down.json()["detail"]

    restart(bed, "channel")
    assert_serves(bed)
    assert {name: bed.procs[name].pid for name in survivors} == survivors
    assert all(bed.procs[name].poll() is None for name in survivors)


@pytest.mark.timeout(300)
def test_expired_deadline_fails_cleanly_while_others_succeed(bed: Testbed) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        slow = pool.submit(post, bed, SLOW_ON_AIR)
        # Let the slow one get going, so the others overlap it.
        wait_until(lambda: in_flight(bed.channel_metrics_port, "channel") >= 1 or slow.done(), 30,
                   "the slow request to reach the channel emulator")
        quick = [pool.submit(post, bed, {**QUICK, "seed": 10 + i}) for i in range(3)]
        for future in quick:
            resp = future.result(timeout=REQUEST_TIMEOUT_S + ANSWER_SLACK_S)
            assert resp.status_code == 200, resp.text
        expired = slow.result(timeout=REQUEST_TIMEOUT_S + ANSWER_SLACK_S)
        elapsed = time.monotonic() - started
    assert_clean_error(expired, {504})
    assert "deadline" in expired.json()["detail"].lower()
    assert elapsed < REQUEST_TIMEOUT_S + ANSWER_SLACK_S
    # The cancelled stream leaves nothing behind: the next request is served.
    wait_until(lambda: in_flight(bed.channel_metrics_port, "channel") == 0, 30, "the channel emulator to idle")
    assert_serves(bed, 1)

"""The device's front door under hostile or careless clients (issue 11) and strict requests (issue 17)."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from conftest import Testbed

PROMPT = "a red circle on a white background"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metric(url: str, name: str, labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (``k="v",...``; any order)."""
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", httpx.get(url, timeout=5).text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in want.items()):
            total += float(m.group(2))
    return total


def _wait_for(predicate, deadline_s: float, what: str) -> None:  # noqa: ANN001
    """Liveness: poll until ``predicate()`` holds; fail only if it never does within a generous deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"never happened within {deadline_s:.0f} s: {what}")


def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b" " * n


@pytest.mark.parametrize("body, field", [
    ({"codec": "uint8", "codec_params": {"foo": "bar"}}, "codec_params.foo"),
    ({"codec": "uint8", "codec_params": {"side_info": "!!"}}, "codec_params.side_info"),   # a header field
    ({"codec": "analog", "channel": {"model": "awgn", "snr_db": 5, "fec": "ldpc"}}, "channel.fec"),
    ({"channel": {"model": "ideal", "snr_db": 5}}, "channel.snr_db"),
    ({"channel": {"model": "awgn"}}, "channel.snr_db"),                                  # no hidden 10 dB default
    ({"channel": {"model": "awgn", "snr_db": "5"}}, "channel.snr_db"),
    ({"seed": "1"}, "seed"),
    ({"channel": {"model": "rayleigh", "snr_db": 5, "k_factor": 3}}, "channel.k_factor"),
    ({"channel": {"model": "awgn", "snr_db": 5, "code_rate": 0.5}}, "channel.code_rate"),
])
def test_meaningless_requests_are_422_naming_the_field(testbed: Testbed, body: dict, field: str) -> None:
    resp = httpx.post(f"{testbed.url}/v1/generate", json={"prompt": PROMPT, "steps": 2, **body}, timeout=60)
    assert resp.status_code == 422, resp.text
    errors = resp.json().get("errors") or [{"field": resp.json()["detail"].split(":")[0]}]
    assert field in {e["field"] for e in errors}, resp.text


@pytest.mark.parametrize("raw", [b"\xff\xfe{\"prompt\": 1}", b"[" * 100_000 + b"]" * 100_000, b"{not json"])
def test_unparsable_bodies_are_422(testbed: Testbed, raw: bytes) -> None:
    resp = httpx.post(f"{testbed.url}/v1/generate", content=raw, headers={"content-type": "application/json"},
                      timeout=60)
    if len(raw) > 64 * 1024:
        assert resp.status_code == 413, resp.text
    else:
        assert resp.status_code == 422, resp.text


def test_chunked_body_over_the_limit_is_413_without_growing_the_device(testbed: Testbed) -> None:
    pid = testbed.procs["device"].pid
    before = _rss_mb(pid)
    resp = httpx.post(f"{testbed.url}/v1/generate", content=_chunks(50 << 20),
                      headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 413, resp.text
    assert "transfer-encoding" not in resp.request.headers or resp.request.headers["transfer-encoding"] == "chunked"
    assert _rss_mb(pid) - before < 100.0


def _raw_request(port: int, head: bytes, read_timeout: float = 30.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(head)
        return s.recv(65536)


def test_without_a_key_the_body_is_never_read(fresh_testbed: Testbed) -> None:
    fresh_testbed.env["MEG_API_KEY"] = "k1"
    fresh_testbed.up()
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    # The device answers as soon as the headers are in, although not one body byte was sent.
    answer = _raw_request(fresh_testbed.device_port, head)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    ok = httpx.post(f"{fresh_testbed.url}/v1/generate", json={"prompt": PROMPT, "steps": 2},
                    headers={"Authorization": "Bearer k1"}, timeout=60)
    assert ok.status_code == 200, ok.text
    # History belongs to the key that made the request.
    other = httpx.get(f"{fresh_testbed.url}/v1/history", headers={"Authorization": "Bearer k1"}, timeout=10)
    assert [r["id"] for r in other.json()["requests"]] == [ok.json()["id"]]
    assert "owner" not in other.json()["requests"][0]


def test_slow_headers_are_cut_off(testbed: Testbed) -> None:
    with socket.create_connection(("127.0.0.1", testbed.device_port), timeout=60) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # ... and never the blank line
        s.settimeout(60)
        assert s.recv(1024) == b""  # closed by the device (header deadline), not by us


def _statuses(url: str, service: str) -> dict[str, float]:
    """``meg_requests_total`` of ``service`` by status (for a failure message that says what happened)."""
    out: dict[str, float] = {}
    for m in re.finditer(r'^meg_requests_total\{([^}]*)\} (\S+)$', httpx.get(url, timeout=5).text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("service") == service:
            key = f"{labels.get('codec')}/{labels.get('status')}"
            out[key] = out.get(key, 0.0) + float(m.group(2))
    return out


def test_client_disconnect_cancels_the_request_end_to_end(testbed: Testbed) -> None:
    device_metrics = f"{testbed.url}/metrics"
    edge_metrics = f"http://127.0.0.1:{testbed.edge_metrics_port}/metrics"
    edge_cancelled = 'service="edge",codec="raw-fp16",channel="ideal",status="cancelled"'
    cancelled_before = _metric(edge_metrics, "meg_requests_total", edge_cancelled)
    edge_before = _statuses(edge_metrics, "edge")
    outcome: list[str] = []

    def long_request() -> None:
        try:
            resp = httpx.post(f"{testbed.url}/v1/generate", json={"prompt": PROMPT, "steps": 200, "seed": 1},
                              timeout=httpx.Timeout(2.0))
            outcome.append(f"answered {resp.status_code}: {resp.text[:200]}")
        except httpx.TimeoutException:
            outcome.append("timed out")  # the client gives up and closes its connection

    thread = threading.Thread(target=long_request)
    thread.start()
    # The edge has the request (not only the device): cancelling it must then stop work on the edge.
    _wait_for(lambda: _metric(edge_metrics, "meg_requests_in_flight", 'service="edge"') >= 1, 30,
              "the long request is in flight on the edge")
    thread.join()
    assert outcome == ["timed out"], f"the 200-step request was expected to outlast the client: {outcome}"
    _wait_for(lambda: _metric(device_metrics, "meg_requests_in_flight", 'service="device"') == 0, 10,
              "the device's in-flight gauge drops after the client left")
    try:
        _wait_for(lambda: _metric(edge_metrics, "meg_requests_total", edge_cancelled) > cancelled_before, 30,
                  "the edge counts the request as cancelled (it stopped the work)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; edge requests by codec/status before {edge_before}, after "
                             f"{_statuses(edge_metrics, 'edge')}; device {_statuses(device_metrics, 'device')}") \
            from None


def test_a_huge_request_is_refused_at_once_and_a_long_one_does_not_stall_a_small_one(testbed: Testbed) -> None:
    huge = httpx.post(f"{testbed.url}/v1/generate", timeout=10,
                      json={"prompt": PROMPT, "steps": 1, "width": 4096, "height": 4096})
    assert huge.status_code == 422 and "budget" in huge.json()["detail"], huge.text
    finished: dict[str, float] = {}

    def send(name: str, steps: int) -> None:
        resp = httpx.post(f"{testbed.url}/v1/generate", json={"prompt": PROMPT, "steps": steps, "seed": 2},
                          timeout=300)
        assert resp.status_code == 200, resp.text
        finished[name] = time.monotonic()

    long = threading.Thread(target=send, args=("long", 200))
    long.start()
    _wait_for(lambda: _metric(f"{testbed.url}/metrics", "meg_requests_in_flight", 'service="device"') >= 1, 30,
              "the long request is in flight")
    send("small", 2)
    long.join()
    # The small request joined the running batch between steps and left it done, before the long one.
    assert finished["small"] < finished["long"]

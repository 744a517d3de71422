"""A real Prometheus, started by `meg up` (what `make up` runs), scrapes all three services and answers queries
for the end-to-end latency histogram and the bits per request with the values of the requests just made.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``; .ci/run installs it); skips without it.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import REPO, free_port
from meg_cli.prometheus_config import ScrapeTargets, render_prometheus_config
from telemetry.metrics import LATENCY_BUCKETS, snr_bucket

PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 0.5
PROMPT = "a red circle on a white background"


@dataclass
class MegUp:
    """A `meg up` process (its own session: the services and Prometheus are its children) and its ports."""

    proc: subprocess.Popen
    device_port: int
    prometheus_port: int
    log_path: Path

    @property
    def device_url(self) -> str:
        return f"http://127.0.0.1:{self.device_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C for `meg up` (it stops its services), then make sure nothing of its process group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test created; normally already empty
    except ProcessLookupError:
        pass


@pytest.fixture()
def meg_up(testbed_model_dir: Path, tmp_path: Path) -> Iterator[MegUp]:
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    ports = {name: free_port() for name in ("edge", "edge-metrics", "channel", "channel-metrics", "device",
                                            "prometheus")}
    cmd = [sys.executable, "-m", "meg_cli.main", "up", "--model-dir", str(testbed_model_dir),
           *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))),
           "--prometheus-scrape-interval", str(SCRAPE_INTERVAL_S), "--prometheus-data-dir", str(tmp_path / "tsdb")]
    log_path = tmp_path / "meg-up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    bed = MegUp(proc, ports["device"], ports["prometheus"], log_path)
    try:
        deadline = time.monotonic() + 240
        while not (_ok(f"{bed.device_url}/healthz") and _ok(f"{bed.prometheus_url}/-/ready")):
            assert proc.poll() is None, f"meg up exited with {proc.returncode}:\n{bed.log_tail()}"
            assert time.monotonic() < deadline, f"meg up not ready after 240 s:\n{bed.log_tail()}"
            time.sleep(0.5)
        yield bed
    finally:
        _stop(proc)


def query(bed: MegUp, promql: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{bed.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    resp.raise_for_status()
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(bed: MegUp, promql: str) -> float | None:
    result = query(bed, promql)
    return float(result[0]["value"][1]) if result else None


def wait_for_value(bed: MegUp, promql: str, expected: float, timeout: float = 60.0) -> float:
    """Poll until the query answers ``expected`` (scrapes are periodic), bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = scalar(bed, promql)
        if value is not None and math.isclose(value, expected, rel_tol=1e-9, abs_tol=1e-6):
            return value
        time.sleep(SCRAPE_INTERVAL_S)
    raise AssertionError(f"{promql} = {value} after {timeout} s, expected {expected}")


def test_meg_up_prometheus_scrapes_latency_and_bits(meg_up: MegUp) -> None:
    requests = [("raw-fp16", {"model": "ideal"}), ("uint8", {"model": "awgn", "snr_db": 5}),
                ("analog", {"model": "awgn", "snr_db": 12}), ("uint8", {"model": "rayleigh", "snr_db": 20})]
    outs = []
    for i, (codec, channel) in enumerate(requests):
        resp = httpx.post(f"{meg_up.device_url}/v1/generate", timeout=120, json={
            "prompt": PROMPT, "seed": i, "steps": 4, "codec": codec, "channel": channel})
        assert resp.status_code == 200, resp.text
        outs.append(resp.json())

    # Prometheus scrapes the three services on the ports `meg up` really started them on.
    up = {r["metric"]["job"]: r["value"][1] for r in query(meg_up, "up")}
    assert up == {"meg-edge": "1", "meg-channel": "1", "meg-device": "1"}

    n = len(outs)
    e2e = 'meg_stage_seconds{service="device",stage="end_to_end"}'
    wait_for_value(meg_up, f"sum({e2e.replace('{', '_count{', 1)})", n)
    # The histogram's sum is the total latency the API reported, request by request.
    wait_for_value(meg_up, f"sum({e2e.replace('{', '_sum{', 1)})", sum(o["timings_ms"]["total"] for o in outs) / 1e3)
    median = scalar(meg_up, "histogram_quantile(0.5, sum by (le) "
                            f"({e2e.replace('{', '_bucket{', 1)}))")
    # histogram_quantile interpolates inside a bucket: at most the first bucket bound above the slowest request.
    slowest_s = max(o["timings_ms"]["total"] for o in outs) / 1e3
    assert median is not None and 0 < median <= min(b for b in LATENCY_BUCKETS if b >= slowest_s)

    # Payload per request (bytes, Prometheus' base unit): count, sum and each label set's sum equal what the
    # API returned in bits.
    wait_for_value(meg_up, 'sum(meg_request_payload_bytes_count{service="device"})', n)
    wait_for_value(meg_up, 'sum(meg_request_payload_bytes_sum{service="device"})',
                   sum(o["bits_sent"] for o in outs) / 8)
    expected: dict[tuple[str, str, str], float] = defaultdict(float)
    for (codec, channel), out in zip(requests, outs):
        expected[(codec, channel["model"], snr_bucket(channel.get("snr_db")))] += out["bits_sent"] / 8
    series = {(r["metric"]["codec"], r["metric"]["channel"], r["metric"]["snr_bucket"]): float(r["value"][1])
              for r in query(meg_up, 'meg_request_payload_bytes_sum{service="device"}')}
    assert series == dict(expected)

    # The other two services' series arrive too: one denoise on the edge and one channel pass per request.
    wait_for_value(meg_up, 'sum(meg_stage_seconds_count{service="edge",stage="denoise"})', n)
    wait_for_value(meg_up, 'sum(meg_stage_seconds_count{service="channel",stage="channel"})', n)


def test_rendered_config_points_at_the_ports_in_use() -> None:
    import yaml

    rendered = yaml.safe_load(render_prometheus_config(ScrapeTargets("0.0.0.0", 19101, 19102, 18000), 0.25))
    targets = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
               for job in rendered["scrape_configs"]}
    assert targets == {"meg-edge": ["127.0.0.1:19101"], "meg-channel": ["127.0.0.1:19102"],
                       "meg-device": ["127.0.0.1:18000"]}
    assert rendered["global"]["scrape_interval"] == rendered["global"]["scrape_timeout"] == "250ms"
    # Without an interval the committed one stays.
    default = yaml.safe_load(render_prometheus_config(ScrapeTargets("127.0.0.1", 9101, 9102, 8000)))
    assert default["global"]["scrape_interval"] == "2s"

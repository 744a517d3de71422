"""`meg up` supervises its services: a SIGKILLed edge comes back, the others keep running, requests work again,
and Ctrl-C then stops everything with exit status 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest

from conftest import REPO, free_port

STARTUP_S = 300.0   # three services importing torch on a loaded 2-core host
RESTORE_S = 120.0   # a restarted edge loads its model again


class UpRun:
    """A `meg up` process on free loopback ports, its log in a file."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.device_port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meg_cli.main", "up", "--no-prometheus", "--model-dir", str(model_dir),
             "--edge-port", str(free_port()), "--edge-metrics-port", str(free_port()),
             "--channel-port", str(free_port()), "--channel-metrics-port", str(free_port()),
             "--device-port", str(self.device_port), "--request-timeout-s", "60"],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.device_port}"

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, list[int]]:
        """Every pid each service was started with, in order (from the supervisor's log)."""
        found: dict[str, list[int]] = {}
        for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", self.text()):
            found.setdefault(name, []).append(int(pid))
        return found

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"meg up exited with {self.proc.returncode}:\n{self.text()[-4000:]}"
            if condition():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.text()[-4000:]}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture()
def up_run(testbed_model_dir: Path, tmp_path: Path) -> Iterator[UpRun]:
    run = UpRun(testbed_model_dir, tmp_path / "up.log")
    try:
        yield run
    finally:
        run.close()
        for pids in run.pids().values():  # nothing orphaned, whatever happened
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its parent's wait() is missing.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


@pytest.mark.timeout(600)
def test_a_killed_edge_is_restarted_and_the_others_keep_running(up_run: UpRun) -> None:
    # `meg up` says when its start-up is over; a service killed before then stops the testbed by design.
    up_run.wait_for("the testbed to be up", lambda: "testbed up:" in up_run.text() and up_run.healthy(), STARTUP_S)
    before = up_run.pids()
    assert set(before) == {"edge", "channel", "device"}, before

    os.kill(before["edge"][-1], signal.SIGKILL)
    up_run.wait_for("the supervisor to restart the edge", lambda: len(up_run.pids()["edge"]) == 2, 30)
    assert re.search(r"edge \(pid \d+\) exited with signal SIGKILL .* restarting it in 0\.5 s", up_run.text())
    up_run.wait_for("the testbed to be healthy again", lambda: "testbed healthy again" in up_run.text()
                    and up_run.healthy(), RESTORE_S)

    resp = httpx.post(f"{up_run.url}/v1/generate", timeout=120, json={
        "prompt": "a red circle on a white background", "seed": 1, "steps": 4,
        "codec": "raw-fp16", "channel": {"model": "ideal"}})
    assert resp.status_code == 200, resp.text
    after = up_run.pids()
    assert after["channel"] == before["channel"] and after["device"] == before["device"]
    assert _alive(after["channel"][0]) and _alive(after["device"][0]) and _alive(after["edge"][-1])
    assert after["edge"][-1] != before["edge"][-1]

    # Ctrl-C: everything stops, status 0, no native-thread abort in any service's output.
    assert up_run.close() == 0
    text = up_run.text()
    assert "terminate called" not in text and "Traceback" not in text, text[-3000:]
    # Quiet logs: the known library warnings are silenced, health polls are not logged at INFO.
    for noise in ("torch.jit.script", "pip install accelerate", "will be ignored", "Loading weights",
                  "HTTP Request:", "FakeTensor"):
        assert noise not in text, noise
    for pids in after.values():
        assert not any(_alive(pid) for pid in pids)

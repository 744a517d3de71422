"""Shared fixtures: free loopback ports and a real testbed of three service processes (Petals-style)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import build_tiny_ldm  # noqa: E402


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_ldm(tmp_path_factory.mktemp("tiny_ldm"))


def embedded_model_dir() -> Path:
    return REPO / "models" / "shapes_v1"


@pytest.fixture(scope="session")
def testbed_model_dir(tiny_model_dir: Path) -> Path:
    """The embedded default when it is present (it is committed), else the tiny random model."""
    override = os.environ.get("MEG_TEST_MODEL_DIR")
    if override:
        return Path(override)
    embedded = embedded_model_dir()
    return embedded if (embedded / "unet" / "config.json").is_file() else tiny_model_dir


@dataclass
class Testbed:
    """Three service processes on free loopback ports."""

    __test__ = False  # a helper, not a test class

    model_dir: Path
    edge_port: int = field(default_factory=free_port)
    channel_port: int = field(default_factory=free_port)
    device_port: int = field(default_factory=free_port)
    edge_metrics_port: int = field(default_factory=free_port)
    channel_metrics_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)
    edge_args: list[str] = field(default_factory=list)
    channel_args: list[str] = field(default_factory=list)
    device_args: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.device_port}"

    def command(self, name: str) -> list[str]:
        meg = [sys.executable, "-m", "meg_cli.main"]
        if name == "edge":
            return [*meg, "edge", "--port", str(self.edge_port), "--metrics-port", str(self.edge_metrics_port),
                    "--model-dir", str(self.model_dir), *self.edge_args]
        if name == "channel":
            return [*meg, "channel", "--port", str(self.channel_port), "--metrics-port",
                    str(self.channel_metrics_port), "--edge", f"127.0.0.1:{self.edge_port}", *self.channel_args]
        return [*meg, "device", "--port", str(self.device_port), "--channel", f"127.0.0.1:{self.channel_port}",
                "--model-dir", str(self.model_dir), "--request-timeout-s", "60", *self.device_args]

    def start(self, name: str) -> None:
        assert self.logs is not None
        log = open(self.logs / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.procs[name] = subprocess.Popen(self.command(name), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_text(name)[-3000:]}")
            try:
                resp = httpx.get(f"{self.url}/healthz", timeout=3.0)
                if resp.status_code == 200:
                    return
                last = resp.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.3)
        raise TimeoutError(f"testbed not healthy after {timeout} s: {last}")

    def log_text(self, name: str) -> str:
        assert self.logs is not None
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def up(self) -> "Testbed":
        for name in ("edge", "channel", "device"):
            self.start(name)
        self.wait_healthy()
        return self

    def down(self) -> None:
        for name in ("device", "channel", "edge"):
            self.stop(name)


@pytest.fixture(scope="session")
def testbed(testbed_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    bed = Testbed(testbed_model_dir, logs=tmp_path_factory.mktemp("testbed_logs"))
    try:
        yield bed.up()
    finally:
        bed.down()


@pytest.fixture()
def fresh_testbed(testbed_model_dir: Path, tmp_path: Path) -> Iterator[Testbed]:
    """A private testbed for tests that kill or reconfigure services."""
    bed = Testbed(testbed_model_dir, logs=tmp_path)
    try:
        yield bed
    finally:
        bed.down()

"""A local testbed for benchmarks: edge, channel emulator and device as subprocesses on free loopback ports.

The same three ``meg`` services a deployment runs, started the way the test suite starts them, so a
benchmark measures the real processes, sockets and serialisation. Service logs go to ``log_dir``, or to a
temporary folder that is removed when the testbed goes down (also on Ctrl-C); when a service fails to come
up, the end of its log is in the exception.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("edge", "channel", "device")


def default_model_dir() -> Path:
    return REPO_ROOT / "models" / "shapes_v1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalTestbed:
    """Start with ``with LocalTestbed(...) as bed:``; ``bed.url`` is the device's REST base URL.

    The test suite subclasses it (``tests/conftest.py``) and also starts, kills and restarts single services.
    """

    model_dir: Path = field(default_factory=default_model_dir)
    edge_args: list[str] = field(default_factory=list)
    channel_args: list[str] = field(default_factory=list)
    device_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0
    log_level: str = "WARNING"
    edge_port: int = field(default_factory=free_port)
    channel_port: int = field(default_factory=free_port)
    device_port: int = field(default_factory=free_port)
    edge_metrics_port: int = field(default_factory=free_port)
    channel_metrics_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    log_dir: Path | None = None
    #: Whether log_dir is a temporary folder this testbed made (and so removes in down()).
    owns_log_dir: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.device_port}"

    def command(self, name: str) -> list[str]:
        meg = [sys.executable, "-m", "meg_cli.main"]
        common = ["--log-level", self.log_level]
        if name == "edge":
            return [*meg, "edge", "--port", str(self.edge_port), "--metrics-port", str(self.edge_metrics_port),
                    "--model-dir", str(self.model_dir), *common, *self.edge_args]
        if name == "channel":
            return [*meg, "channel", "--port", str(self.channel_port), "--metrics-port",
                    str(self.channel_metrics_port), "--edge", f"127.0.0.1:{self.edge_port}", *common,
                    *self.channel_args]
        return [*meg, "device", "--port", str(self.device_port), "--channel", f"127.0.0.1:{self.channel_port}",
                "--model-dir", str(self.model_dir), *common, *self.device_args]

    def start_service(self, name: str) -> None:
        """Start one service (again, after a kill) on its fixed port, appending to its log."""
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="meg-bench-"))
            self.owns_log_dir = True
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_dir / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(self.command(name), cwd=REPO_ROOT, stdout=out,
                                                stderr=subprocess.STDOUT, env=env)

    def stop_service(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log" if self.log_dir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Until the device's /healthz answers 200 (it checks channel and edge); fail fast if a service exits."""
        timeout = self.startup_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; log {self.log_dir}/{name}.log:\n"
                                       f"{self.log_text(name)[-3000:]}")
            try:
                resp = httpx.get(f"{self.url}/healthz", timeout=3.0)
                if resp.status_code == 200:
                    return
                last = resp.text
            except httpx.HTTPError as exc:
                last = str(exc)
            time.sleep(0.3)
        tails = "".join(f"\n--- {name}.log:\n{self.log_text(name)[-1500:]}" for name in self.procs)
        raise TimeoutError(f"testbed not healthy after {timeout:.0f} s ({last}); logs in {self.log_dir}{tails}")

    def up(self) -> "LocalTestbed":
        for name in SERVICES:
            self.start_service(name)
        try:
            self.wait_healthy()
        except BaseException:  # Ctrl-C while waiting too: no service or temporary folder is left behind
            self.down()
            raise
        log.info("testbed up at %s (edge %s; logs in %s)", self.url, " ".join(self.edge_args) or "defaults",
                 self.log_dir)
        return self

    def down(self) -> None:
        try:
            for name in reversed(SERVICES):
                self.stop_service(name)
        finally:
            if self.owns_log_dir and self.log_dir is not None:
                shutil.rmtree(self.log_dir, ignore_errors=True)
                self.log_dir, self.owns_log_dir = None, False

    def __enter__(self) -> "LocalTestbed":
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

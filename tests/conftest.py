"""Shared fixtures: free loopback ports and a real testbed of three service processes (Petals-style)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.testbed import LocalTestbed, free_port  # noqa: E402,F401  (free_port: used by tests)
from tiny_models import build_tiny_ldm  # noqa: E402


#: Fixtures that start service processes: a test using one is a multi-process test, marked ``slow``.
MULTI_PROCESS_FIXTURES = frozenset({"testbed", "fresh_testbed", "meg_up", "up_run"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every multi-process test ``slow`` (``-m "not slow"`` runs the in-process suite in a minute or two;
    ``make test`` runs everything)."""
    for item in items:
        if MULTI_PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


class Testbed(LocalTestbed):
    """Three service processes on free loopback ports (the benchmarks' testbed, with test-friendly names)."""

    __test__ = False  # a helper, not a test class

    def __init__(self, model_dir: Path, logs: Path | None = None, **kwargs: Any) -> None:
        super().__init__(model_dir=model_dir, log_dir=logs, log_level="INFO", startup_timeout_s=120.0, **kwargs)
        # A bounded request deadline, so a test that breaks a service still ends.
        self.device_args = ["--request-timeout-s", "60", *self.device_args]

    @property
    def logs(self) -> Path | None:
        return self.log_dir

    def start(self, name: str) -> None:
        self.start_service(name)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        self.stop_service(name, sig)

    def up(self) -> "Testbed":
        super().up()
        return self


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

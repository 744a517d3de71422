"""The edge's watchdog turns its health NOT_SERVING while the compute worker is stuck, and back after."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Sequence

from grpc_health.v1 import health, health_pb2

from serving.scheduler import SchedulerConfig, StepScheduler
from edge_server.watchdog import progress_watchdog

WAIT_S = 30.0


@dataclass
class StuckModel:
    """One step that blocks until the test releases it."""

    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def admit(self, jobs: Sequence[int]) -> list[list[int]]:
        return [[j] for j in jobs]

    def step(self, states: Sequence[list[int]]) -> None:
        self.entered.set()
        assert self.release.wait(WAIT_S)
        for s in states:
            s.append(0)

    def done(self, state: list[int]) -> bool:
        return len(state) > 1

    def result(self, state: list[int]) -> int:
        return state[0]


async def _status(servicer: health.aio.HealthServicer, name: str) -> int:
    request = health_pb2.HealthCheckRequest(service=name)
    return (await servicer.Check(request, None)).status


def test_watchdog_reports_a_stuck_worker_and_its_recovery() -> None:
    async def scenario() -> list[int]:
        model = StuckModel()
        scheduler = StepScheduler(model, SchedulerConfig(window_ms=0), cpu=False)
        servicer = health.aio.HealthServicer()
        await servicer.set("edge", health_pb2.HealthCheckResponse.SERVING)
        watch = asyncio.create_task(progress_watchdog(scheduler, ("edge",), limit_s=0.2, period_s=0.05)(servicer))
        seen = [await _status(servicer, "edge")]
        job = asyncio.create_task(scheduler.submit(7))
        await asyncio.get_running_loop().run_in_executor(None, model.entered.wait, WAIT_S)
        for _ in range(int(WAIT_S / 0.05)):                   # liveness: wait for the state, never time it
            if await _status(servicer, "edge") == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        seen.append(await _status(servicer, "edge"))
        model.release.set()
        assert (await asyncio.wait_for(job, WAIT_S)).value == 7
        for _ in range(int(WAIT_S / 0.05)):
            if await _status(servicer, "edge") == health_pb2.HealthCheckResponse.SERVING:
                break
            await asyncio.sleep(0.05)
        seen.append(await _status(servicer, "edge"))
        watch.cancel()
        scheduler.stop()
        return seen

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert asyncio.run(scenario()) == [serving, not_serving, serving]

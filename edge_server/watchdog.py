"""The compute worker's watchdog: the edge reports NOT_SERVING while its worker makes no progress.

A queue can be short and the server responsive while the one compute worker is stuck (a hung kernel, a
step far slower than any budget allowed): health checks must say so, so the device answers 503 with the
reason and an orchestrator can restart the edge. The worker's own clock (:meth:`StepScheduler.stalled_s`)
says how long the current step has run; past ``limit_s`` the edge's health turns NOT_SERVING, and back to
SERVING once steps complete again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Protocol

from grpc_health.v1 import health

from serving.grpc_service import NOT_SERVING, SERVING

log = logging.getLogger(__name__)


class Progressing(Protocol):
    def stalled_s(self) -> float: ...


def progress_watchdog(worker: Progressing, services: tuple[str, ...], limit_s: float, period_s: float = 0.5
                      ) -> Callable[[health.aio.HealthServicer], Awaitable[None]]:
    """A background task for :func:`serving.grpc_service.run_grpc_service` that publishes the worker's
    progress as the health of ``services``."""

    async def watch(health_servicer: health.aio.HealthServicer) -> None:
        stalled = False
        while True:
            now_stalled = worker.stalled_s() > limit_s
            if now_stalled != stalled:
                stalled = now_stalled
                for name in services:
                    await health_servicer.set(name, NOT_SERVING if stalled else SERVING)
                if stalled:
                    log.error("compute worker made no progress for %.0f s: reporting NOT_SERVING", limit_s)
                else:
                    log.info("compute worker progresses again: SERVING")
            await asyncio.sleep(period_s)

    return watch

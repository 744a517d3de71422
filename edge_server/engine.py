"""Moved: the request-level batching engine became a policy of the step scheduler
(:mod:`edge_server.scheduler`, ``policy="request"``). These names keep existing imports working."""

from edge_server.scheduler import (  # noqa: F401
    QueueFullError, SchedulerConfig, SchedulerStoppedError, default_cpu_threads,
)

EngineConfig = SchedulerConfig
EngineStoppedError = SchedulerStoppedError

"""Iteration-level scheduling: requests join and leave the running batch at step boundaries.

As continuous batching does for LLM tokens: one compute worker repeatedly advances every running request by
one step in one batched call; between two steps it drops cancelled requests, hands back finished ones and
admits waiting ones up to ``max_batch``. A request that arrives while others run therefore waits for one step,
not for a whole batch to finish. What a "step" is belongs to a :class:`StepModel` (a denoising step of the
diffusion model here, a decode step of a language model later), so this module knows nothing about images.

Policies (:class:`Policy`): ``step`` (the above) and ``request`` (the request-level batching of old: a batch
runs to completion before anyone joins), kept as a policy of the same loop so the two can be compared.

Admission is bounded: a full queue refuses at once with :class:`QueueFullError` and a retry-after estimate
(the edge answers RESOURCE_EXHAUSTED, the device 503 + Retry-After) rather than turning a burst into
timeouts for everyone. Compute runs on one worker thread (one accelerator); callers await on asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Sequence, TypeVar

import torch

from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)

JobT = TypeVar("JobT")
StateT = TypeVar("StateT")
ResultT = TypeVar("ResultT")


class StepModel(Protocol[JobT, StateT, ResultT]):
    """What the scheduler drives. All methods are called from the scheduler's worker thread only."""

    def admit(self, jobs: Sequence[JobT]) -> Sequence[StateT]:
        """Prepare newly admitted jobs (one batched call for all of them, e.g. prompt encoding); one state each."""

    def step(self, states: Sequence[StateT]) -> None:
        """Advance every state by one step (in as few batched calls as the states allow)."""

    def done(self, state: StateT) -> bool:
        """Whether ``state`` has taken all its steps."""

    def result(self, state: StateT) -> ResultT:
        """The answer of a finished state."""


class QueueFullError(RuntimeError):
    """The queue is full; retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"queue is full ({depth} requests waiting); retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class SchedulerStoppedError(RuntimeError):
    """The scheduler is shutting down and accepts no new work."""


class Policy(str, enum.Enum):
    STEP = "step"          # join and leave at every step boundary
    REQUEST = "request"    # a batch runs to completion before new requests join


def default_cpu_threads() -> int:
    """Intra-op threads for CPU compute: one fewer than the cores, at least one.

    Why not torch's default (every core): the edge's gRPC, encoding and, on a single-host testbed, the
    channel emulator and device share those cores, and OpenMP workers spin-wait for a core that is busy.
    On the 2-core CI host a 20-step request of the embedded model took ~6 s with 2 threads and ~0.8 s
    with 1 under that load.
    """
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass
class SchedulerConfig:
    max_batch: int = field(default=8, metadata={"help": "most requests stepped together (1 disables batching)"})
    window_ms: float = field(default=10.0, metadata={
        "help": "when idle, how long to wait for more arrivals before the first step"})
    max_queue: int = field(default=64, metadata={"help": "waiting requests beyond which new ones are refused"})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch intra-op threads of the compute worker on CPU (0: one fewer than the cores)"})
    policy: str = field(default="step", metadata={  # a literal: `meg --help` reads defaults from source
        "help": "step: requests join and leave the batch at every denoising step; request: a batch runs to "
                "completion before new requests join"})

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {self.max_batch}")
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be ≥ 0, got {self.window_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {self.max_queue}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be ≥ 0 (0: automatic), got {self.cpu_threads}")
        try:
            Policy(self.policy)
        except ValueError:
            raise ValueError(f"policy must be one of {', '.join(p.value for p in Policy)}, got {self.policy!r}") \
                from None


@dataclass
class Completion(Generic[ResultT]):
    """A finished request with where its time went."""

    value: ResultT
    queue_s: float       # submitted → admitted
    admit_s: float       # the admission call it shared with the other joiners (e.g. prompt encoding)
    run_s: float         # admitted → finished: its steps, interleaved with those of its batch mates
    steps: int           # steps it took part in
    mean_batch: float    # mean number of requests in the steps it took part in


@dataclass(eq=False)
class _Ticket:
    job: Any
    request_id: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    admit_s: float = 0.0
    steps: int = 0
    rows_sum: int = 0
    state: Any = None

    def resolve(self, outcome: Any) -> None:
        """Hand ``outcome`` (a value or an exception) to the awaiting task, from any thread."""
        def set_it() -> None:
            if self.future.done():
                return
            if isinstance(outcome, BaseException):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)
        try:
            self.loop.call_soon_threadsafe(set_it)
        except RuntimeError:  # the caller's loop is gone (shutdown): nobody is waiting any more
            pass


class StepScheduler(Generic[JobT, StateT, ResultT]):
    """Owns the compute worker thread, the bounded queue and admission. ``submit`` is called from asyncio.

    Threads: torch's intra-op thread count is set by the worker thread for itself when it starts (never by
    the constructor, which would change it for whatever thread builds the scheduler, e.g. a test runner).
    """

    def __init__(self, model: StepModel[JobT, StateT, ResultT], config: SchedulerConfig,
                 metrics: MegMetrics | None = None, *, cpu: bool = True, name: str = "compute") -> None:
        self.model = model
        self.config = config
        self.policy = Policy(config.policy)
        self.metrics = metrics
        self.cpu_threads = (config.cpu_threads or default_cpu_threads()) if cpu else None
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._running: list[_Ticket] = []
        self._stopping = False
        self._abandon = False
        self._busy_since: float | None = None  # when the current admission or step began (the watchdog's clock)
        self._step_s = 0.05         # moving average of one step's duration (for retry-after)
        self._steps_per_job = 20.0  # moving average of the steps a request takes
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- asyncio side ----------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Requests waiting for admission."""
        return len(self._waiting)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def running(self) -> int:
        """Requests in the running batch."""
        return len(self._running)

    async def submit(self, job: JobT, request_id: str = "") -> Completion[ResultT]:
        """Queue ``job`` and wait for its result. Cancelling the awaiting task drops the job at the next step
        boundary (or from the queue when it has not started)."""
        loop = asyncio.get_running_loop()
        ticket = _Ticket(job, request_id, loop, loop.create_future())
        self._enqueue(ticket)
        try:
            return await ticket.future
        except asyncio.CancelledError:
            ticket.cancelled.set()
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
            self._gauge()
            raise

    def _enqueue(self, ticket: _Ticket) -> None:
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("shutting down: no new work is accepted")
            if len(self._waiting) >= self.config.max_queue:
                if self.metrics is not None:
                    self.metrics.error("queue_full")
                raise QueueFullError(len(self._waiting), self.retry_after_s())
            self._waiting.append(ticket)
            self._cond.notify()
        self._gauge()

    def stalled_s(self) -> float:
        """How long the worker has been inside one admission or step (0 when idle or between steps): a
        worker that stops making progress shows here, while the queue alone cannot tell."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def retry_after_s(self) -> float:
        """When a refused request would likely be admitted: the queue ahead of it, at the measured step rate."""
        batches_ahead = (len(self._waiting) + len(self._running)) / self.config.max_batch
        return max(1.0, batches_ahead * self._steps_per_job * self._step_s)

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting work; with ``drain`` finish what is running and queued, else fail it at once."""
        with self._cond:
            self._stopping = True
            self._abandon = not drain
            self._cond.notify_all()
        self._thread.join(timeout)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.metrics.service).set(len(self._waiting))

    # -- worker thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.cpu_threads is not None:
            # Per thread under OpenMP: the compute thread computes with this many, other threads keep theirs.
            torch.set_num_threads(self.cpu_threads)
        while self._next_iteration():
            pass
        self._fail_all(SchedulerStoppedError("shut down before this request finished"))

    def _next_iteration(self) -> bool:
        """One scheduling iteration: wait for work if idle, admit, step, hand back. False when stopped."""
        if not self._running and not self._wait_for_work():
            return False
        if self._abandon:
            return False
        self._drop_cancelled()
        self._busy_since = time.monotonic()
        try:
            if self.policy is Policy.STEP or not self._running:
                self._admit(self._take(self.config.max_batch - len(self._running)))
            if self._running:
                self._step()
        finally:
            self._busy_since = None
        return True

    def _wait_for_work(self) -> bool:
        """Block until something waits (then hold the batching window) or the scheduler stops."""
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if not self._waiting:
                return False
        deadline = time.perf_counter() + self.config.window_ms / 1000.0
        with self._cond:
            while (len(self._waiting) < self.config.max_batch and not self._stopping
                   and (left := deadline - time.perf_counter()) > 0):
                self._cond.wait(left)
        return True

    def _take(self, n: int) -> list[_Ticket]:
        taken: list[_Ticket] = []
        with self._cond:
            while self._waiting and len(taken) < n:
                ticket = self._waiting.popleft()
                if not ticket.cancelled.is_set():
                    taken.append(ticket)
        self._gauge()
        return taken

    def _admit(self, joiners: list[_Ticket]) -> None:
        if not joiners:
            return
        started = time.perf_counter()
        try:
            states = list(self.model.admit([t.job for t in joiners]))
            if len(states) != len(joiners):
                raise RuntimeError(f"the model admitted {len(states)} of {len(joiners)} jobs")
        except Exception as exc:  # a failed admission fails its requests, never the worker
            log.exception("admitting %d requests failed", len(joiners))
            for ticket in joiners:
                ticket.resolve(exc)
            return
        admit_s = time.perf_counter() - started
        for ticket, state in zip(joiners, states):
            ticket.admitted, ticket.admit_s, ticket.state = started, admit_s, state
            log.debug("admitted after %.3f s in the queue", started - ticket.enqueued,
                      extra={"request_id": ticket.request_id})
        # A job with nothing to do is answered at once rather than handed to a step.
        self._running.extend(t for t in joiners if not self._finish_if_done(t))

    def _drop_cancelled(self) -> None:
        kept = [t for t in self._running if not t.cancelled.is_set()]
        for ticket in self._running:
            if ticket.cancelled.is_set():
                log.info("cancelled: left the batch after %d steps", ticket.steps,
                         extra={"request_id": ticket.request_id})
        self._running = kept

    def _step(self) -> None:
        batch = self._running
        started = time.perf_counter()
        try:
            self.model.step([t.state for t in batch])
        except Exception as exc:  # a failed step fails the requests in it, never the worker
            log.exception("a step of %d requests failed", len(batch))
            for ticket in batch:
                ticket.resolve(exc)
            self._running = []
            return
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - started)
        if self.metrics is not None:
            self.metrics.batch_size.labels(self.metrics.service).observe(len(batch))
        for ticket in batch:
            ticket.steps += 1
            ticket.rows_sum += len(batch)
        self._running = [t for t in batch if not self._finish_if_done(t)]

    def _finish_if_done(self, ticket: _Ticket) -> bool:
        try:
            if not self.model.done(ticket.state):
                return False
            value = self.model.result(ticket.state)
        except Exception as exc:
            log.exception("collecting a result failed", extra={"request_id": ticket.request_id})
            ticket.resolve(exc)
            return True
        now = time.perf_counter()
        self._steps_per_job = 0.9 * self._steps_per_job + 0.1 * ticket.steps
        ticket.resolve(Completion(value, ticket.admitted - ticket.enqueued, ticket.admit_s, now - ticket.admitted,
                                  ticket.steps, ticket.rows_sum / max(1, ticket.steps)))
        return True

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            pending = list(self._waiting) + self._running
            self._waiting.clear()
            self._running = []
        for ticket in pending:
            ticket.resolve(exc)
        self._gauge()

"""Dynamic batching engine: a bounded queue in front of one compute worker.

Requests that arrive within ``window_ms`` of each other and share (steps, latent shape, split step) run
through the text encoder and the denoiser as one batch; per-request seeds and guidance scales stay exact
(see :mod:`models.denoising`). The queue is bounded: a full queue rejects at once (the caller answers
RESOURCE_EXHAUSTED, the device 503 + Retry-After) rather than turning a burst into timeouts for everyone.
Compute runs on one worker thread (one accelerator), while encoding and streaming of finished requests run
on the asyncio side, so they overlap the next batch's compute.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from edge_server.backends import BatchItem, TextToImageBackend
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The edge queue is full; retry after ``retry_after_s``."""

    def __init__(self, depth: int, retry_after_s: float) -> None:
        super().__init__(f"edge queue is full ({depth} requests waiting); retry after {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and accepts no new work."""


def default_cpu_threads() -> int:
    """Intra-op threads for CPU compute: one fewer than the cores, at least one.

    Why not torch's default (every core): the edge's gRPC, encoding and, on a single-host testbed, the
    channel emulator and device share those cores, and OpenMP workers spin-wait for a core that is busy.
    On the 2-core CI host a 20-step request of the embedded model took ~6 s with 2 threads and ~0.8 s
    with 1 under that load.
    """
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass
class EngineConfig:
    max_batch: int = field(default=8, metadata={"help": "largest denoising batch (1 disables batching)"})
    window_ms: float = field(default=10.0, metadata={"help": "how long a batch waits for more requests (ms)"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond which new ones are refused"})
    cpu_threads: int = field(default=0, metadata={  # 0: default_cpu_threads()
        "help": "torch threads for CPU compute (0: one fewer than the cores, at least 1)"})

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {self.max_batch}")
        if self.window_ms < 0:
            raise ValueError(f"window_ms must be ≥ 0, got {self.window_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be ≥ 1, got {self.max_queue}")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be ≥ 0 (0: automatic), got {self.cpu_threads}")


@dataclass
class JobResult:
    latents: torch.Tensor
    queue_s: float
    text_encode_s: float
    denoise_s: float
    batch_size: int


@dataclass
class Job:
    request_id: str
    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    split_step: int
    shape: tuple[int, int, int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[JobResult]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[int, tuple[int, int, int], int]:
        return self.steps, self.shape, self.split_step

    def resolve(self, result: JobResult | BaseException) -> None:
        def set_it() -> None:
            if self.future.done():
                return
            if isinstance(result, asyncio.CancelledError):
                self.future.cancel()
            elif isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)
        self.loop.call_soon_threadsafe(set_it)


class BatchingEngine:
    """Owns the compute worker thread. ``submit`` is called from the asyncio loop."""

    def __init__(self, backend: TextToImageBackend, config: EngineConfig, metrics: MegMetrics | None = None
                 ) -> None:
        self.backend = backend
        self.config = config
        self.metrics = metrics
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=config.max_queue)
        self._held: collections.deque[Job] = collections.deque()  # taken from the queue, other batch key
        self._stopping = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._avg_batch_s = 1.0
        self.cpu_threads = None
        if backend.device.type == "cpu":
            # Set from the constructing (main) thread, so threads started later — the compute worker and the
            # codec encoders — inherit it; the worker sets it again for itself in case it did not.
            self.cpu_threads = config.cpu_threads or default_cpu_threads()
            torch.set_num_threads(self.cpu_threads)
        self._thread = threading.Thread(target=self._run, name="edge-compute", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize() + len(self._held)

    async def submit(self, job: Job) -> JobResult:
        """Queue ``job`` and wait for its latents. Cancelling the awaiting task drops the job from its batch."""
        if self._stopping.is_set():
            raise EngineStoppedError("edge is shutting down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(self.depth, self._retry_after()) from None
        self._gauge()
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled.set()
            raise

    def _retry_after(self) -> float:
        batches_ahead = max(1.0, self.depth / self.config.max_batch)
        return max(1.0, batches_ahead * self._avg_batch_s)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.metrics.service).set(self.depth)

    def _next_batch(self) -> list[Job]:
        first = self._held.popleft() if self._held else self._queue.get()
        if first is None:
            return []
        batch = [first]
        deadline = time.perf_counter() + self.config.window_ms / 1000.0
        # Jobs already held back with the same key join first, in arrival order.
        for job in list(self._held):
            if len(batch) < self.config.max_batch and job.key == first.key:
                self._held.remove(job)
                batch.append(job)
        while len(batch) < self.config.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # shutdown sentinel: finish this batch, the run loop then exits
                break
            if job.key == first.key:
                batch.append(job)
            else:
                self._held.append(job)
        return [j for j in batch if not j.cancelled.is_set()]

    def _run(self) -> None:
        if self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)
        while True:
            if self._stopping.is_set() and self._queue.empty() and not self._held:
                break
            batch = self._next_batch()
            self._gauge()
            if not batch:
                if self._stopping.is_set():
                    break
                continue
            self._idle.clear()
            started = time.perf_counter()
            steps, shape, split = batch[0].key
            items = [BatchItem(j.prompt, j.seed, j.guidance_scale, j.cancelled) for j in batch]
            try:
                result = self.backend.generate(items, steps, shape, split)
            except Exception as exc:  # a failed batch fails its requests, never the worker
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.resolve(exc)
                self._idle.set()
                continue
            elapsed = time.perf_counter() - started
            self._avg_batch_s = 0.8 * self._avg_batch_s + 0.2 * elapsed
            if self.metrics is not None:
                self.metrics.batch_size.labels(self.metrics.service).observe(len(batch))
            for job, latents in zip(batch, result.latents):
                if latents is None:
                    job.resolve(asyncio.CancelledError())
                    continue
                job.resolve(JobResult(latents, started - job.enqueued, result.text_encode_s, result.denoise_s,
                                      len(batch)))
            self._idle.set()

    def stop(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting work; with ``drain`` finish what is queued, else cancel it."""
        self._stopping.set()
        if not drain:
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.cancelled.set()
                    job.resolve(EngineStoppedError("edge shut down before this request ran"))
            for job in self._held:
                job.resolve(EngineStoppedError("edge shut down before this request ran"))
            self._held.clear()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

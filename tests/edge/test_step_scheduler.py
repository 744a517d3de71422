"""The edge's iteration-level step scheduler, without a network.

The generic scheduler is driven with a counting model whose steps are released one by one by the test (a
semaphore), so "joins mid-run" or "cancelled after two steps" are exact scenarios, not races. The diffusion
model is then checked for exactness on the tiny random ldm model: a request's latents are those of a solo run
whatever joins, leaves, step counts and split points share its batches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import pytest
import torch

from edge_server.diffusion import DiffusionJob, DiffusionStepModel
from serving.scheduler import (
    Completion, QueueFullError, SchedulerConfig, SchedulerStoppedError, StepScheduler,
)
from models.backends import BatchItem, load_backend

WAIT_S = 30.0  # generous bound for "eventually" (never a timing assertion: only a hang guard)


@dataclass
class CountJob:
    name: str
    steps: int
    fail_at: int | None = None     # raise when this job takes this step


@dataclass
class CountState:
    job: CountJob
    taken: int = 0


@dataclass
class CountingModel:
    """A StepModel whose every step waits for a permit from the test and logs who took part."""

    gate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    batches: list[list[str]] = field(default_factory=list)
    admissions: list[list[str]] = field(default_factory=list)
    threads_seen: list[int] = field(default_factory=list)
    entered: int = 0               # steps begun (the worker may be blocked in the last one)

    def admit(self, jobs: Sequence[CountJob]) -> list[CountState]:
        self.admissions.append([j.name for j in jobs])
        return [CountState(j) for j in jobs]

    def step(self, states: Sequence[CountState]) -> None:
        self.entered += 1
        assert self.gate.acquire(timeout=WAIT_S), "test never released this step"
        self.threads_seen.append(torch.get_num_threads())
        self.batches.append([s.job.name for s in states])
        for s in states:
            if s.job.fail_at == s.taken + 1:
                raise RuntimeError(f"{s.job.name} failed")
            s.taken += 1

    def done(self, state: CountState) -> bool:
        return state.taken >= state.job.steps

    def result(self, state: CountState) -> str:
        return f"{state.job.name}:{state.taken}"

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()


def make(model: Any, **config: Any) -> StepScheduler:
    return StepScheduler(model, SchedulerConfig(**{"window_ms": 0.0, "cpu_threads": 1, **config}))


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        await asyncio.sleep(0.005)


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), WAIT_S * 2))


def test_a_request_joins_the_running_batch_at_the_next_step() -> None:
    model = CountingModel()
    sched = make(model, policy="step")

    async def scenario() -> tuple[Completion, Completion]:
        a = asyncio.create_task(sched.submit(CountJob("a", 6)))
        await until(lambda: model.entered == 1, "a's first step")
        model.release(1)
        await until(lambda: model.entered == 2, "a's second step")
        b = asyncio.create_task(sched.submit(CountJob("b", 3)))   # arrives while a's second step runs
        await until(lambda: sched.depth == 1, "b to queue")
        model.release(100)
        return await a, await b

    ca, cb = run(scenario)
    sched.stop()
    assert (ca.value, cb.value) == ("a:6", "b:3")
    assert model.batches[:2] == [["a"], ["a"]]
    assert model.batches[2:5] == [["a", "b"]] * 3     # b joined at the third step of a, left after its third
    assert model.batches[5:] == [["a"]]
    assert model.admissions == [["a"], ["b"]]
    assert cb.steps == 3 and cb.mean_batch == 2.0 and ca.steps == 6


def test_request_policy_lets_the_batch_finish_before_anyone_joins() -> None:
    model = CountingModel()
    sched = make(model, policy="request")

    async def scenario() -> None:
        a = asyncio.create_task(sched.submit(CountJob("a", 4)))
        await until(lambda: model.entered == 1, "a's first step")
        b = asyncio.create_task(sched.submit(CountJob("b", 2)))
        await until(lambda: sched.depth == 1, "b to queue")
        model.release(100)
        await a
        await b

    run(scenario)
    sched.stop()
    assert model.batches == [["a"]] * 4 + [["b"]] * 2


def test_a_cancelled_request_leaves_at_the_next_step_boundary() -> None:
    model = CountingModel()
    sched = make(model, max_batch=2, window_ms=1000.0)   # the window gathers both before the first step

    async def scenario() -> Completion:
        a = asyncio.create_task(sched.submit(CountJob("a", 50)))
        b = asyncio.create_task(sched.submit(CountJob("b", 5)))
        await until(lambda: model.entered == 1, "the first step")
        model.release(1)
        await until(lambda: model.entered == 2, "the second step")
        a.cancel()   # during the second step
        with pytest.raises(asyncio.CancelledError):
            await a
        model.release(100)
        return await b

    cb = run(scenario)
    sched.stop()
    assert cb.value == "b:5"
    assert model.batches == [["a", "b"]] * 2 + [["b"]] * 3


def test_a_cancelled_request_that_never_ran_frees_its_queue_slot() -> None:
    model = CountingModel()
    sched = make(model, max_batch=1, max_queue=1)

    async def scenario() -> str:
        a = asyncio.create_task(sched.submit(CountJob("a", 2)))
        await until(lambda: model.entered == 1, "a to run")
        b = asyncio.create_task(sched.submit(CountJob("b", 2)))
        await until(lambda: sched.depth == 1, "b to queue")
        b.cancel()
        await asyncio.gather(b, return_exceptions=True)
        c = asyncio.create_task(sched.submit(CountJob("c", 1)))   # the slot b held is free again
        model.release(100)
        await a
        return (await c).value

    assert run(scenario) == "c:1"
    sched.stop()
    assert ["b"] not in model.batches and model.admissions == [["a"], ["c"]]


def test_mixed_step_counts_share_a_batch_and_leave_when_done() -> None:
    model = CountingModel()
    sched = make(model, window_ms=1000.0, max_batch=3)   # the window gathers all three before the first step

    async def scenario() -> list[Completion]:
        tasks = [asyncio.create_task(sched.submit(CountJob(n, s))) for n, s in (("a", 1), ("b", 3), ("c", 2))]
        model.release(100)
        return list(await asyncio.gather(*tasks))

    done = run(scenario)
    sched.stop()
    assert [c.value for c in done] == ["a:1", "b:3", "c:2"]
    assert model.admissions == [["a", "b", "c"]]   # one admission call for all joiners
    assert model.batches == [["a", "b", "c"], ["b", "c"], ["b"]]


def test_the_batch_never_exceeds_max_batch() -> None:
    model = CountingModel()
    sched = make(model, max_batch=2, window_ms=1000.0)

    async def scenario() -> None:
        tasks = [asyncio.create_task(sched.submit(CountJob(str(i), 2))) for i in range(5)]
        model.release(100)
        await asyncio.gather(*tasks)

    run(scenario)
    sched.stop()
    assert max(len(b) for b in model.batches) == 2
    assert sorted(n for b in model.batches for n in b) == sorted([str(i) for i in range(5)] * 2)


def test_a_full_queue_refuses_with_a_retry_after() -> None:
    model = CountingModel()
    sched = make(model, max_batch=1, max_queue=2)

    async def scenario() -> QueueFullError:
        first = asyncio.create_task(sched.submit(CountJob("run", 1)))
        await until(lambda: model.entered == 1, "the first request to run")
        queued = [asyncio.create_task(sched.submit(CountJob(f"q{i}", 1))) for i in range(2)]
        await until(lambda: sched.depth == 2, "the queue to fill")
        with pytest.raises(QueueFullError) as refused:
            await sched.submit(CountJob("refused", 1))
        model.release(100)
        await asyncio.gather(first, *queued)
        return refused.value

    refused = run(scenario)
    sched.stop()
    assert refused.retry_after_s >= 1.0 and "queue is full" in str(refused)
    assert ["refused"] not in model.batches


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on() -> None:
    model = CountingModel()
    sched = make(model, max_batch=2, window_ms=1000.0)

    async def scenario() -> tuple[list[Any], str]:
        tasks = [asyncio.create_task(sched.submit(CountJob("bad", 3, fail_at=2))),
                 asyncio.create_task(sched.submit(CountJob("mate", 3)))]
        await until(lambda: model.entered == 1, "both to run")
        model.release(100)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, (await sched.submit(CountJob("later", 1))).value

    outcomes, later = run(scenario)
    sched.stop()
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert later == "later:1"


def test_stop_drains_queued_work_then_refuses() -> None:
    model = CountingModel()
    sched = make(model, max_batch=1)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(sched.submit(CountJob(n, 2))) for n in ("a", "b")]
        await until(lambda: model.entered == 1 and sched.depth == 1, "a running, b queued")
        stopper = asyncio.get_running_loop().run_in_executor(None, sched.stop, True, WAIT_S)
        await until(lambda: sched.stopping, "stop to begin")
        with pytest.raises(SchedulerStoppedError):
            await sched.submit(CountJob("late", 1))
        model.release(100)
        await stopper
        return [c.value for c in await asyncio.gather(*tasks)]

    assert run(scenario) == ["a:2", "b:2"]


def test_stop_without_drain_fails_running_and_queued_work() -> None:
    model = CountingModel()
    sched = make(model, max_batch=1)

    async def scenario() -> list[Any]:
        tasks = [asyncio.create_task(sched.submit(CountJob(n, 5))) for n in ("a", "b")]
        await until(lambda: model.entered == 1 and sched.depth == 1, "a running, b queued")
        stopper = asyncio.get_running_loop().run_in_executor(None, sched.stop, False, WAIT_S)
        model.release(1)   # the step in progress may finish; nothing after it runs
        await stopper
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = run(scenario)
    assert all(isinstance(o, SchedulerStoppedError) for o in outcomes)
    assert len(model.batches) <= 2


def test_the_constructor_leaves_the_callers_torch_threads_alone() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    model = CountingModel()
    sched = make(model, cpu_threads=target)

    async def scenario() -> None:
        model.release(1)
        await sched.submit(CountJob("a", 1))

    run(scenario)
    sched.stop()
    assert torch.get_num_threads() == before
    assert model.threads_seen == [target]   # the worker computes with the configured count


def test_invalid_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="fifo")


# ------------------------------------------------------------------------------------ diffusion rows


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_dir: Path) -> Any:
    return load_backend(tiny_model_dir)


@dataclass
class GatedDiffusion:
    """The diffusion step model with steps released by the test, logging batch sizes."""

    inner: DiffusionStepModel
    gate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    sizes: list[int] = field(default_factory=list)
    entered: int = 0

    def admit(self, jobs: Sequence[DiffusionJob]) -> list[Any]:
        return self.inner.admit(jobs)

    def step(self, states: Sequence[Any]) -> None:
        self.entered += 1
        assert self.gate.acquire(timeout=WAIT_S)
        self.sizes.append(len(states))
        self.inner.step(states)

    def done(self, state: Any) -> bool:
        return self.inner.done(state)

    def result(self, state: Any) -> torch.Tensor:
        return self.inner.result(state)


def solo(backend: Any, job: DiffusionJob) -> torch.Tensor:
    item = BatchItem(job.prompt, job.seed, job.guidance_scale, threading.Event())
    out = backend.generate([item], job.steps, job.shape, job.split_step).latents[0]
    assert out is not None
    return out


def test_latents_do_not_depend_on_batch_mates(tiny_backend: Any) -> None:
    """Staggered joins, mixed step counts, a split and a cancelled mate: every request equals its solo run."""
    shape = tiny_backend.latent_shape(0, 0)
    first = DiffusionJob("a red circle", 1, 6, 4.0, 0, shape)
    joiners = [DiffusionJob("a blue square", 2, 4, 7.5, 0, shape),
               DiffusionJob("a green triangle", 3, 5, 2.0, 3, shape),    # split: edge runs 3 of 5
               DiffusionJob("a red circle", 4, 3, 0.0, 0, shape)]
    gated = GatedDiffusion(DiffusionStepModel(tiny_backend))
    sched = make(gated, max_batch=8)

    async def scenario() -> list[Completion]:
        a = asyncio.create_task(sched.submit(first))
        doomed = asyncio.create_task(sched.submit(DiffusionJob("a doomed square", 9, 6, 4.0, 0, shape)))
        await until(lambda: gated.entered == 1, "the first step")
        gated.gate.release(1)
        await until(lambda: gated.entered == 2, "the second step")
        doomed.cancel()
        later = [asyncio.create_task(sched.submit(j)) for j in joiners]   # join at the third step of a
        await until(lambda: sched.depth == 3, "the joiners to queue")
        gated.gate.release(100)
        await asyncio.gather(doomed, return_exceptions=True)
        return [await a] + [await t for t in later]

    done = run(scenario)
    sched.stop()
    assert max(gated.sizes) >= 4          # they really shared steps
    # Only float rounding may differ (kernels reduce in another order at another batch size); a row that used
    # another row's guidance, seed or timestep would be off by orders of magnitude more.
    for job, completion in zip([first, *joiners], done):
        torch.testing.assert_close(completion.value, solo(tiny_backend, job), atol=2e-4, rtol=1e-4)
    # The split request came back in scheduler space after 3 steps, not decoded-space final latents.
    assert done[2].steps == 3 and done[0].steps == 6


def test_joiners_prompts_are_encoded_in_one_call(tiny_backend: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = tiny_backend.latent_shape(0, 0)
    model = DiffusionStepModel(tiny_backend)
    model.admit([DiffusionJob("warm-up", 0, 2, 4.0, 0, shape)])   # caches the empty prompt's embedding
    calls: list[int] = []
    original = tiny_backend.encode_prompts
    monkeypatch.setattr(tiny_backend, "encode_prompts", lambda p, h, w: calls.append(len(p)) or original(p, h, w))
    states = model.admit([DiffusionJob(f"a red circle {i}", i, 2, 4.0, 0, shape) for i in range(5)])
    assert len(states) == 5 and calls == [5]

"""Serving benchmark: a closed-loop load generator against ``POST /v1/generate``, edge batching on vs off.

``meg bench serve`` keeps ``--concurrency`` requests in flight until
``--requests`` have been answered, through the whole testbed (device REST → channel emulator → edge), and
reports

* throughput (answered-200 requests per second of wall-clock time) and its on/off ratio;
* latency percentiles p50/p95/p99 of the successful requests;
* errors by kind: HTTP status plus the stable part of the JSON ``detail`` (a clean 4xx/5xx answer);
* lost requests: answered neither 200 nor a clean JSON error (connection reset, client timeout, non-JSON).

By default it starts its own testbed per mode (three subprocesses on free loopback ports, the embedded
``models/shapes_v1`` model): edge ``--max-batch 8`` (batching on) and ``--max-batch 1`` (off). With
``--url`` it drives a running testbed instead, in whatever batching mode that edge runs (one mode,
``external``). Writes ``serve.csv``, ``serve.json``, ``serve.png`` and ``serve.md`` into ``--out``.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.testbed import LocalTestbed, default_model_dir

log = logging.getLogger("bench.serve")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPTS = ("a red circle on a white background", "a blue square on a white background",
           "a green triangle on a black background", "a yellow circle on a blue background",
           "a small red square on a green background", "a large blue circle on a yellow background",
           "a white triangle on a red background", "a black square on a white background")
GOAL_RATIO = 1.5


@dataclass
class ServeConfig:
    requests: int = 200
    concurrency: int = 32
    steps: int = 20
    codec: str = "raw-fp16"
    timeout_s: float = 600.0          # client-side, per request: past it a request counts as lost
    warmup: int = 8
    max_batch: int = 8                # edge --max-batch when batching is on (off: 1)
    window_ms: float = 10.0           # edge --batch-window-ms when batching is on
    url: str | None = None
    model_dir: Path = field(default_factory=default_model_dir)
    out: Path = RESULTS_DIR

    def modes(self) -> list[str]:
        return ["external"] if self.url else ["on", "off"]

    def edge_args(self, mode: str) -> list[str]:
        queue = ["--max-queue", str(max(64, 2 * self.concurrency))]
        if mode == "on":
            return ["--max-batch", str(self.max_batch), "--batch-window-ms", f"{self.window_ms:g}", *queue]
        return ["--max-batch", "1", *queue]


@dataclass
class Outcome:
    """One request as the client saw it."""

    index: int
    outcome: str                 # ok | error | lost
    kind: str                    # "200", "<status> <detail class>", or the lost reason
    latency_s: float
    status: int | None = None
    batch_size: int | None = None


@dataclass
class ModeResult:
    mode: str
    edge_args: list[str]
    requests: int
    concurrency: int
    ok: int
    errors: int
    lost: int
    wall_s: float
    throughput_rps: float
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_mean_s: float
    latency_max_s: float
    mean_batch_size: float
    errors_by_kind: dict[str, int]
    lost_by_kind: dict[str, int]
    latencies_s: list[float]


def detail_class(detail: str) -> str:
    """The stable part of an error message: its text before the first ':', numbers masked."""
    head = detail.split(":", 1)[0]
    return re.sub(r"\d+(\.\d+)?", "#", head).strip()[:80]


def request_body(config: ServeConfig, index: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index, "steps": config.steps, "codec": config.codec,
            "channel": {"model": "ideal"}}


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], index: int) -> Outcome:
    started = time.perf_counter()
    try:
        resp = await client.post("/v1/generate", json=body)
    except httpx.TimeoutException as exc:
        return Outcome(index, "lost", f"client timeout ({type(exc).__name__})", time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return Outcome(index, "lost", f"transport error ({type(exc).__name__})", time.perf_counter() - started)
    latency = time.perf_counter() - started
    try:
        payload = resp.json()
    except ValueError:
        return Outcome(index, "lost", f"{resp.status_code} non-JSON answer", latency, resp.status_code)
    if resp.status_code == 200 and isinstance(payload, dict) and "image_url" in payload:
        return Outcome(index, "ok", "200", latency, 200, payload.get("batch_size"))
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if 400 <= resp.status_code < 600 and isinstance(detail, str):
        return Outcome(index, "error", f"{resp.status_code} {detail_class(detail)}", latency, resp.status_code)
    return Outcome(index, "lost", f"{resp.status_code} answer without a detail", latency, resp.status_code)


async def drive(url: str, config: ServeConfig, n_requests: int, concurrency: int, first_index: int = 0
                ) -> tuple[list[Outcome], float]:
    """Closed loop: ``concurrency`` workers each send their next request as soon as the last is answered."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    outcomes: list[Outcome] = []
    counter = itertools.count(first_index)
    end = first_index + n_requests
    async with httpx.AsyncClient(base_url=url, timeout=config.timeout_s, limits=limits) as client:
        async def worker() -> None:
            while (index := next(counter)) < end:
                outcomes.append(await one_request(client, request_body(config, index), index))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return sorted(outcomes, key=lambda o: o.index), wall


def summarise(mode: str, edge_args: list[str], outcomes: list[Outcome], wall_s: float, concurrency: int
              ) -> ModeResult:
    ok = [o for o in outcomes if o.outcome == "ok"]
    latencies = np.array([o.latency_s for o in ok]) if ok else np.array([np.nan])
    errors: dict[str, int] = {}
    lost: dict[str, int] = {}
    for o in outcomes:
        if o.outcome == "error":
            errors[o.kind] = errors.get(o.kind, 0) + 1
        elif o.outcome == "lost":
            lost[o.kind] = lost.get(o.kind, 0) + 1
    batches = [o.batch_size for o in ok if o.batch_size]
    return ModeResult(
        mode=mode, edge_args=edge_args, requests=len(outcomes), concurrency=concurrency, ok=len(ok),
        errors=sum(errors.values()), lost=sum(lost.values()), wall_s=wall_s,
        throughput_rps=len(ok) / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=float(np.percentile(latencies, 50)), latency_p95_s=float(np.percentile(latencies, 95)),
        latency_p99_s=float(np.percentile(latencies, 99)), latency_mean_s=float(np.mean(latencies)),
        latency_max_s=float(np.max(latencies)), mean_batch_size=float(np.mean(batches)) if batches else 0.0,
        errors_by_kind=errors, lost_by_kind=lost, latencies_s=[o.latency_s for o in ok])


async def measure(url: str, config: ServeConfig, mode: str, edge_args: list[str]) -> ModeResult:
    if config.warmup:
        # Warm-up burst (first-call costs, allocator, connection pool), not counted.
        warm, _ = await drive(url, config, config.warmup, min(config.warmup, config.concurrency),
                              first_index=10_000_000)
        bad = [o.kind for o in warm if o.outcome != "ok"]
        if bad:
            log.warning("warm-up: %d of %d requests failed (%s)", len(bad), len(warm), ", ".join(sorted(set(bad))))
    log.info("mode %s: %d requests, concurrency %d, %d steps, codec %s", mode, config.requests, config.concurrency,
             config.steps, config.codec)
    outcomes, wall = await drive(url, config, config.requests, config.concurrency)
    result = summarise(mode, edge_args, outcomes, wall, config.concurrency)
    log.info("mode %s: %.3f req/s, p50 %.2f s, p95 %.2f s, p99 %.2f s, %d errors, %d lost, mean batch %.2f",
             mode, result.throughput_rps, result.latency_p50_s, result.latency_p95_s, result.latency_p99_s,
             result.errors, result.lost, result.mean_batch_size)
    return result


def run_mode(config: ServeConfig, mode: str) -> ModeResult:
    if mode == "external":
        assert config.url is not None
        return asyncio.run(measure(config.url, config, mode, []))
    edge_args = config.edge_args(mode)
    with LocalTestbed(config.model_dir, edge_args=edge_args) as bed:
        return asyncio.run(measure(bed.url, config, mode, edge_args))


def environment() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def write_outputs(config: ServeConfig, results: list[ModeResult], env: dict[str, Any]) -> dict[str, Any]:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    by_mode = {r.mode: r for r in results}
    ratio = (by_mode["on"].throughput_rps / by_mode["off"].throughput_rps
             if "on" in by_mode and "off" in by_mode and by_mode["off"].throughput_rps > 0 else None)
    columns = ["mode", "requests", "concurrency", "ok", "errors", "lost", "wall_s", "throughput_rps",
               "latency_p50_s", "latency_p95_s", "latency_p99_s", "latency_mean_s", "latency_max_s",
               "mean_batch_size", "edge_args"]
    with open(out / "serve.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in results:
            row = asdict(r)
            writer.writerow([" ".join(row[c]) if c == "edge_args" else
                             (f"{row[c]:.4f}" if isinstance(row[c], float) else row[c]) for c in columns])
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    summary = {"config": config_json, "environment": env, "throughput_ratio_on_off": ratio,
               "goal_ratio": GOAL_RATIO, "goal_met": (ratio >= GOAL_RATIO) if ratio is not None else None,
               "modes": [asdict(r) for r in results]}
    (out / "serve.json").write_text(json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
    plot(results, out / "serve.png")
    (out / "serve.md").write_text(markdown(config, results, ratio, env))
    return summary


def _finite(value: Any) -> Any:
    """NaN/inf (no successful request to take a percentile of) as null: serve.json stays strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def plot(results: list[ModeResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(10, 4))
    for r in results:
        lat = np.sort(np.array(r.latencies_s))
        if lat.size:
            ax_cdf.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"batching {r.mode}")
    ax_cdf.set_xlabel("end-to-end latency (s)")
    ax_cdf.set_ylabel("fraction of successful requests")
    ax_cdf.set_title("Latency CDF")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend()
    ax_bar.bar([r.mode for r in results], [r.throughput_rps for r in results], color="tab:blue")
    for i, r in enumerate(results):
        ax_bar.text(i, r.throughput_rps, f"{r.throughput_rps:.2f}", ha="center", va="bottom")
    ax_bar.set_ylabel("throughput (successful requests / s)")
    ax_bar.set_title("Throughput by batching mode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(config: ServeConfig, results: list[ModeResult], ratio: float | None, env: dict[str, Any]) -> str:
    lines = ["# Serving benchmark (`meg bench serve`)", "",
             f"{config.requests} requests per mode, closed loop at concurrency {config.concurrency}, "
             f"{config.steps} steps, codec `{config.codec}`, ideal channel, "
             + (f"testbed at {config.url}." if config.url else "a fresh local testbed per mode (embedded "
                f"`{config.model_dir.name}`)."),
             f"Machine: {env['cpus']} CPUs, torch {env['torch']} (the edge computes with its default CPU threads, "
             f"one fewer than the cores), load average at start "
             f"{', '.join(f'{x:.1f}' for x in env['load_average'] or [])}.", "",
             "| mode | edge args | ok | errors | lost | wall (s) | throughput (req/s) | p50 (s) | p95 (s) | "
             "p99 (s) | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | `{' '.join(r.edge_args) or '-'}` | {r.ok} | {r.errors} | {r.lost} | "
                     f"{r.wall_s:.1f} | {r.throughput_rps:.3f} | {r.latency_p50_s:.2f} | {r.latency_p95_s:.2f} | "
                     f"{r.latency_p99_s:.2f} | {r.mean_batch_size:.2f} |")
    lines.append("")
    if ratio is not None:
        verdict = "meets" if ratio >= GOAL_RATIO else "does not meet"
        lines.append(f"Throughput with batching on / off: **{ratio:.2f}x** ({verdict} the {GOAL_RATIO}x goal).")
    for r in results:
        for title, kinds in (("errors", r.errors_by_kind), ("lost", r.lost_by_kind)):
            if kinds:
                lines.append("")
                lines.append(f"{title} ({r.mode}): " + "; ".join(f"{k}: {n}" for k, n in sorted(kinds.items())))
    lines.append("")
    return "\n".join(lines)

# ------------------------------------------------------------------------------------------------ open loop
#
# ``meg bench serve --open-loop``: requests arrive as a Poisson process at a stated rate, whatever the state of
# the server (an open loop: a slow server does not slow the arrivals down, unlike the closed loop above), and
# the edge's step scheduler is compared with request-level batching at the same arrival rate. The rate is a
# fraction (``--load``) of the capacity: the closed-loop throughput of the request-level batcher at
# ``--capacity-concurrency``, measured first in the same run (or given with ``--rate``).

POLICIES = ("request", "step")
OPEN_LOOP_GOAL = 0.85     # step scheduler mean latency / request-level mean latency, at most


@dataclass
class OpenLoopConfig:
    requests: int = 300               # arrivals per policy
    load: float = 0.7                 # arrival rate as a fraction of the measured capacity
    rate_rps: float | None = None     # a fixed arrival rate instead (skips the capacity measurement)
    capacity_requests: int = 160
    capacity_concurrency: int = 32
    steps: int = 20
    size: int = 64                    # image height and width
    codec: str = "raw-fp16"
    timeout_s: float = 600.0
    warmup: int = 8
    max_batch: int = 8
    window_ms: float = 10.0
    seed: int = 0                     # of the arrival times (both policies see the same arrivals)
    segments: int = 10                # parts run in ABBA order (see run_open_loop)
    model_dir: Path = field(default_factory=default_model_dir)
    out: Path = RESULTS_DIR

    def serve_config(self, requests: int, concurrency: int) -> ServeConfig:
        """The closed-loop settings of the same requests (capacity measurement, warm-up)."""
        return ServeConfig(requests=requests, concurrency=concurrency, steps=self.steps, codec=self.codec,
                           timeout_s=self.timeout_s, warmup=self.warmup, max_batch=self.max_batch,
                           window_ms=self.window_ms, model_dir=self.model_dir, out=self.out)

    def edge_args(self, policy: str) -> list[str]:
        return ["--policy", policy, "--max-batch", str(self.max_batch), "--batch-window-ms", f"{self.window_ms:g}",
                "--max-queue", str(max(64, 2 * self.capacity_concurrency))]


def poisson_arrivals(n: int, rate_rps: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of ``n`` requests of a Poisson process at ``rate_rps``, conditioned on
    ``n`` arrivals in ``n / rate_rps`` seconds: sorted uniform times on that span (an exact property of the
    Poisson process). Why not cumulated exponential gaps: over 300 arrivals their sum strays by ±6 % (one
    standard deviation), so the load actually offered would miss the stated one by as much."""
    times = np.sort(np.random.default_rng(seed).uniform(0.0, n / rate_rps, size=n))
    return [float(t) for t in times]


def open_loop_body(config: OpenLoopConfig, index: int) -> dict[str, Any]:
    return {"prompt": PROMPTS[index % len(PROMPTS)], "seed": index, "steps": config.steps, "codec": config.codec,
            "height": config.size, "width": config.size, "channel": {"model": "ideal"}}


async def drive_open_loop(url: str, config: OpenLoopConfig, arrivals: list[float], first_index: int = 0
                          ) -> tuple[list[Outcome], float]:
    """Send request ``first_index + i`` at ``arrivals[i]`` s after the start, whatever is still in flight.
    Latency counts from the scheduled arrival, so a late send (a busy client) is charged to the server."""
    limits = httpx.Limits(max_connections=len(arrivals), max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=config.timeout_s, limits=limits) as client:
        started = time.perf_counter()

        async def one(index: int, at: float) -> Outcome:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            outcome = await one_request(client, open_loop_body(config, index), index)
            outcome.latency_s = time.perf_counter() - (started + at)
            return outcome

        outcomes = await asyncio.gather(*(one(first_index + i, at) for i, at in enumerate(arrivals)))
        wall = time.perf_counter() - started
    return sorted(outcomes, key=lambda o: o.index), wall


async def _warm_up(url: str, config: OpenLoopConfig, policy: str) -> None:
    warm, _ = await drive(url, config.serve_config(config.warmup, config.warmup), config.warmup, config.warmup,
                          first_index=10_000_000)
    if any(o.outcome != "ok" for o in warm):
        log.warning("warm-up (%s): %d of %d failed", policy, sum(o.outcome != "ok" for o in warm), len(warm))


def segments(arrivals: list[float], count: int) -> list[tuple[int, list[float]]]:
    """``arrivals`` cut into ``count`` consecutive parts: (index of the first, times from the part's start)."""
    bounds = np.linspace(0, len(arrivals), count + 1).round().astype(int)
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        origin = arrivals[lo - 1] if lo else 0.0
        parts.append((int(lo), [t - origin for t in arrivals[lo:hi]]))
    return parts


@dataclass
class SegmentRun:
    policy: str
    segment: int
    first_index: int
    arrivals: int
    wall_s: float
    mean_latency_s: float
    load_average_before: list[float] | None
    load_average_after: list[float] | None


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


@dataclass
class OpenLoopReport:
    config: OpenLoopConfig
    capacity: ModeResult | None       # the request-level closed loop the rate derives from
    rate_rps: float
    results: list[ModeResult]
    runs: list[SegmentRun] = field(default_factory=list)
    step_closed_loop: ModeResult | None = None   # the step scheduler in the capacity's closed loop

    def by_policy(self, policy: str) -> ModeResult:
        return next(r for r in self.results if r.mode == policy)

    @property
    def mean_ratio(self) -> float | None:
        """Mean latency of the step scheduler over request-level batching."""
        request, step = self.by_policy("request"), self.by_policy("step")
        return step.latency_mean_s / request.latency_mean_s if request.latency_mean_s > 0 else None


def run_open_loop(config: OpenLoopConfig) -> OpenLoopReport:
    """Capacity (unless a rate is given), then the same Poisson arrivals against both policies.

    Both testbeds stay up and only one is driven at a time. The arrivals are cut into ``config.segments`` parts
    run in ABBA order (request, step, step, request, ...), so drift in the load of a shared machine hits both
    policies alike instead of whichever ran second; each part starts from an idle server.
    """
    with LocalTestbed(config.model_dir, edge_args=config.edge_args("request")) as request_bed, \
            LocalTestbed(config.model_dir, edge_args=config.edge_args("step")) as step_bed:
        beds = {"request": request_bed, "step": step_bed}
        closed = _closed_loops(config, beds)
        rate = config.rate_rps or config.load * closed["request"].throughput_rps
        log.info("arrivals at %.3f req/s", rate)
        outcomes: dict[str, list[Outcome]] = {p: [] for p in POLICIES}
        runs: list[SegmentRun] = []
        for k, (first, times) in enumerate(segments(poisson_arrivals(config.requests, rate, config.seed),
                                                    config.segments)):
            for policy in (POLICIES if k % 2 == 0 else POLICIES[::-1]):
                before = _load_average()
                got, wall = asyncio.run(drive_open_loop(beds[policy].url, config, times, first))
                outcomes[policy] += got
                mean = float(np.mean([o.latency_s for o in got if o.outcome == "ok"] or [np.nan]))
                runs.append(SegmentRun(policy, k, first, len(times), wall, mean, before, _load_average()))
                log.info("segment %d, %s scheduler: %d arrivals, mean %.2f s", k, policy, len(times), mean)
    results = [summarise(p, config.edge_args(p), outcomes[p], sum(r.wall_s for r in runs if r.policy == p), 0)
               for p in POLICIES]
    return OpenLoopReport(config, closed.get("request"), rate, results, runs, closed.get("step"))


def _closed_loops(config: OpenLoopConfig, beds: dict[str, LocalTestbed]) -> dict[str, ModeResult]:
    """The closed loop at ``capacity_concurrency`` on both testbeds (unless a rate is given: then a warm-up).
    The request-level throughput is the capacity; the step scheduler's is reported beside it, and running it
    leaves both servers equally warm (every batch size seen) before the open loop."""
    if config.rate_rps is not None:
        for policy, bed in beds.items():
            if config.warmup:
                asyncio.run(_warm_up(bed.url, config, policy))
        return {}
    closed = config.serve_config(config.capacity_requests, config.capacity_concurrency)
    return {policy: asyncio.run(measure(bed.url, closed, f"closed loop ({policy})", config.edge_args(policy)))
            for policy, bed in beds.items()}


def write_open_loop_outputs(report: OpenLoopReport, env: dict[str, Any]) -> dict[str, Any]:
    out = report.config.out
    out.mkdir(parents=True, exist_ok=True)
    columns = ["mode", "requests", "ok", "errors", "lost", "wall_s", "latency_mean_s", "latency_p50_s",
               "latency_p95_s", "latency_p99_s", "latency_max_s", "mean_batch_size"]
    with open(out / "serve_open_loop.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "arrival_rate_rps", *columns[1:]])
        for r in report.results:
            row = asdict(r)
            writer.writerow([r.mode, f"{report.rate_rps:.4f}",
                             *(f"{row[c]:.4f}" if isinstance(row[c], float) else row[c] for c in columns[1:])])
    ratio = report.mean_ratio
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(report.config).items()}
    summary = {"config": config_json, "environment": env, "arrival_rate_rps": report.rate_rps,
               "arrivals_span_s": report.config.requests / report.rate_rps,
               "capacity": asdict(report.capacity) if report.capacity else None,
               "capacity_rps": report.capacity.throughput_rps if report.capacity else None,
               "step_closed_loop": asdict(report.step_closed_loop) if report.step_closed_loop else None,
               "mean_latency_ratio_step_request": ratio, "goal_ratio": OPEN_LOOP_GOAL,
               "goal_met": (ratio <= OPEN_LOOP_GOAL and all(r.lost == 0 for r in report.results))
               if ratio is not None else None,
               "policies": [asdict(r) for r in report.results], "segments": [asdict(r) for r in report.runs]}
    (out / "serve_open_loop.json").write_text(json.dumps(_finite(summary), indent=1, allow_nan=False) + "\n")
    plot_open_loop(report, out / "serve_open_loop.png")
    (out / "serve_open_loop.md").write_text(open_loop_markdown(report, env))
    return summary


def plot_open_loop(report: OpenLoopReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(10, 4))
    stats = ("latency_mean_s", "latency_p50_s", "latency_p95_s", "latency_p99_s")
    width = 0.8 / len(report.results)
    for i, r in enumerate(report.results):
        lat = np.sort(np.array(r.latencies_s))
        if lat.size:
            ax_cdf.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=f"{r.mode} scheduler")
        ax_bar.bar(np.arange(len(stats)) + i * width, [getattr(r, s) for s in stats], width, label=r.mode)
    ax_cdf.set_xlabel("end-to-end latency (s)")
    ax_cdf.set_ylabel("fraction of successful requests")
    ax_cdf.set_title(f"Latency CDF, Poisson arrivals at {report.rate_rps:.2f} req/s")
    ax_cdf.grid(alpha=0.3)
    ax_cdf.legend()
    ax_bar.set_xticks(np.arange(len(stats)) + width * (len(report.results) - 1) / 2,
                      ["mean", "p50", "p95", "p99"])
    ax_bar.set_ylabel("latency (s)")
    ax_bar.set_title("Latency by scheduler policy")
    ax_bar.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def open_loop_markdown(report: OpenLoopReport, env: dict[str, Any]) -> str:
    c, ratio = report.config, report.mean_ratio
    cap = report.capacity
    source = (f"{c.load:.0%} of the capacity, {cap.throughput_rps:.3f} req/s = closed-loop throughput of "
              f"request-level batching at concurrency {cap.concurrency} ({cap.ok} requests) measured in this run"
              if cap else "a fixed rate (--rate)")
    step_cap = report.step_closed_loop
    if step_cap:
        source += f"; the step scheduler's closed-loop throughput there: {step_cap.throughput_rps:.3f} req/s"
    lines = ["# Serving benchmark, open loop (`meg bench serve --open-loop`)", "",
             f"{c.requests} Poisson arrivals per policy at **{report.rate_rps:.3f} req/s** ({source}); "
             f"{c.size}×{c.size}, {c.steps} steps, codec `{c.codec}`, ideal channel, edge batch ≤ {c.max_batch}, "
             f"the same arrival times for both policies, each on its own local testbed (embedded "
             f"`{c.model_dir.name}`), driven in {c.segments} segments in ABBA order so that load drift on the shared "
             "machine hits both alike. Latency counts from the scheduled arrival.",
             f"Machine: {env['cpus']} CPUs, torch {env['torch']}, load average at start "
             f"{', '.join(f'{x:.1f}' for x in env['load_average'] or [])}.", "",
             "| scheduler | ok | errors | lost | mean (s) | p50 (s) | p95 (s) | p99 (s) | max (s) | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        lines.append(f"| {r.mode} | {r.ok} | {r.errors} | {r.lost} | {r.latency_mean_s:.2f} | {r.latency_p50_s:.2f} | "
                     f"{r.latency_p95_s:.2f} | {r.latency_p99_s:.2f} | {r.latency_max_s:.2f} | "
                     f"{r.mean_batch_size:.2f} |")
    lines.append("")
    if ratio is not None:
        lost = sum(r.lost for r in report.results)
        verdict = "meets" if ratio <= OPEN_LOOP_GOAL and lost == 0 else "does not meet"
        lines.append(f"Mean latency, step scheduler / request-level batching: **{ratio:.2f}x**, {lost} lost "
                     f"({verdict} the goal: at most {OPEN_LOOP_GOAL}x and none lost).")
    for r in report.results:
        for title, kinds in (("errors", r.errors_by_kind), ("lost", r.lost_by_kind)):
            if kinds:
                lines += ["", f"{title} ({r.mode}): " + "; ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))]
    return "\n".join(lines + ["", *segment_table(report.runs), ""])


def segment_table(runs: list[SegmentRun]) -> list[str]:
    def load(values: list[float] | None) -> str:
        return f"{values[0]:.1f}" if values else "-"

    lines = ["| segment | scheduler | arrivals | mean latency (s) | 1-min load average before → after |",
             "|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.segment} | {r.policy} | {r.arrivals} | {r.mean_latency_s:.2f} | "
                     f"{load(r.load_average_before)} → {load(r.load_average_after)} |")
    return lines


def open_loop_main(args: Any) -> int:
    """``meg bench serve --open-loop`` with the arguments :func:`bench.cli.parse` gave."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    q = args.quick
    config = OpenLoopConfig(
        requests=args.requests or (12 if q else 300), load=args.load, rate_rps=args.rate,
        capacity_requests=args.capacity_requests or (16 if q else 160),
        capacity_concurrency=args.capacity_concurrency or (4 if q else 32), steps=args.steps or (4 if q else 20),
        codec=args.codec, timeout_s=args.timeout_s, warmup=args.warmup if args.warmup is not None else (2 if q else 8),
        max_batch=args.max_batch, window_ms=args.batch_window_ms, seed=args.seed,
        segments=args.segments or (2 if q else 10), model_dir=args.model_dir or default_model_dir(), out=args.out)
    summary = write_open_loop_outputs(run_open_loop(config), environment())
    log.info("mean latency step/request: %s (goal ≤ %.2f); wrote %s/serve_open_loop.{csv,json,png,md}",
             summary["mean_latency_ratio_step_request"], OPEN_LOOP_GOAL, config.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``meg bench serve [--quick] [--url URL] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("serve", argv)
    if args.open_loop:
        return open_loop_main(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    quick = args.quick
    config = ServeConfig(
        requests=args.requests or (16 if quick else 200), concurrency=args.concurrency or (4 if quick else 32),
        steps=args.steps or (4 if quick else 20), codec=args.codec, timeout_s=args.timeout_s,
        warmup=args.warmup if args.warmup is not None else (2 if quick else 8), max_batch=args.max_batch,
        window_ms=args.batch_window_ms, url=args.url, model_dir=args.model_dir or default_model_dir(), out=args.out)
    env = environment()
    results = [run_mode(config, mode) for mode in config.modes()]
    summary = write_outputs(config, results, env)
    if summary["throughput_ratio_on_off"] is not None:
        log.info("throughput ratio on/off: %.2fx (goal %.1fx)", summary["throughput_ratio_on_off"], GOAL_RATIO)
    log.info("wrote %s/serve.{csv,json,png,md}", config.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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


def main(argv: list[str] | None = None) -> int:
    """``meg bench serve [--quick] [--url URL] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("serve", argv)
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

"""``meg bench soak``: a bounded soak of the supervised testbed (``meg up``) at moderate load with injected
faults, reporting what a person would lose.

Faults, spread over the run after the warm-up: the edge SIGKILLed and the channel emulator SIGKILLed
(``meg up`` restarts each with backoff while the others keep running), a delay spike (20 s of requests over a
2 s one-way link) and a burst of bad requests. Each request is a **success** (a 200 whose image can be
fetched), a **clean refusal** (a 4xx/5xx JSON answer with a detail: 503 while a service restarts, 422 for the
bad burst) or **lost** (no answer, a non-JSON answer, or a 200 whose image is missing). Per fault the
recovery time is the time from the fault to the next success; per service the RSS growth is measured from
the first sample after the warm-up to the end (a restarted service from its restart).

Default 20 minutes; ``--minutes`` shortens it. Writes ``soak.{csv,json,md,png}`` into ``--out``.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.serve import detail_class
from bench.testbed import REPO_ROOT, default_model_dir, free_port

log = logging.getLogger("bench.soak")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVICES = ("edge", "channel", "device")
PROMPTS = ("a red circle on a white background", "a blue square on a black background",
           "a green triangle on a yellow background")
GOAL_RSS_GROWTH = 0.05
SPIKE_S = 20.0
#: What the device's 503 answers say while a service restarts (Retry-After).
RETRY_AFTER_S = 2.0


@dataclass
class SoakConfig:
    minutes: float = 20.0
    concurrency: int = 2            # moderate: the 2-core host also runs the three services
    steps: int = 10
    warmup_s: float = 30.0
    bad_burst: int = 50
    model_dir: Path = field(default_factory=default_model_dir)
    out: Path = RESULTS_DIR


@dataclass
class Seen:
    """One request as the client saw it."""

    t_s: float                      # completion time since the start of the soak
    outcome: str                    # ok | refused | lost
    kind: str
    latency_s: float


@dataclass
class Fault:
    name: str
    at_s: float
    recovery_s: float | None = None


async def soak_request(client: httpx.AsyncClient, body: Any, t0: float) -> Seen:
    started = time.monotonic()

    def seen(outcome: str, kind: str) -> Seen:
        return Seen(time.monotonic() - t0, outcome, kind, time.monotonic() - started)

    try:
        resp = await client.post("/v1/generate", json=body) if isinstance(body, dict) else \
            await client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        payload = resp.json()
    except httpx.HTTPError as exc:
        return seen("lost", f"no answer ({type(exc).__name__})")
    except ValueError:
        return seen("lost", f"{resp.status_code} non-JSON answer")
    if resp.status_code == 200 and isinstance(payload, dict) and "image_url" in payload:
        try:
            image = await client.get(payload["image_url"])
        except httpx.HTTPError as exc:
            return seen("lost", f"image fetch failed ({type(exc).__name__})")
        ok = image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        return seen("ok", "200") if ok else seen("lost", "200 whose image is missing")
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if 400 <= resp.status_code < 600 and isinstance(detail, str):
        return seen("refused", f"{resp.status_code} {detail_class(detail)}")
    return seen("lost", f"{resp.status_code} answer without a detail")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def service_pids(up_pid: int) -> dict[str, int]:
    """``meg up``'s service children by name, read from their command lines (``meg_cli.main <service>``)."""
    found: dict[str, int] = {}
    for task in Path(f"/proc/{up_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for name in SERVICES:
                if name.encode() in argv[:4]:
                    found[name] = int(child)
    return found


class SoakRun:
    """One soak: the supervised testbed, the load, the faults, and what the clients saw."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.ports = {name: free_port() for name in ("device", "edge", "channel", "edge_m", "channel_m")}
        self.url = f"http://127.0.0.1:{self.ports['device']}"
        self.seen: list[Seen] = []
        self.faults: list[Fault] = []
        self.rss: list[tuple[float, str, int, float]] = []      # (t, service, pid, MB)
        self.t0 = time.monotonic()
        self.up: subprocess.Popen | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        c, p = self.config, self.ports
        cmd = [sys.executable, "-m", "meg_cli.main", "up", "--no-prometheus", "--model-dir", str(c.model_dir),
               "--device-port", str(p["device"]), "--edge-port", str(p["edge"]), "--channel-port", str(p["channel"]),
               "--edge-metrics-port", str(p["edge_m"]), "--channel-metrics-port", str(p["channel_m"]),
               "--log-level", "WARNING"]
        self.up = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    self.t0 = time.monotonic()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the testbed did not come up within 300 s")

    def stop(self) -> None:
        if self.up is not None and self.up.poll() is None:
            os.killpg(self.up.pid, signal.SIGTERM)
            try:
                self.up.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.up.pid, signal.SIGKILL)

    def body(self, i: int) -> dict[str, Any]:
        spike = any(f.name == "delay spike" and f.at_s <= self.now() <= f.at_s + SPIKE_S for f in self.faults)
        channel = {"model": "awgn", "snr_db": 10, **({"delay_ms": 2000} if spike else {})}
        return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": self.config.steps, "codec": "uint8",
                "channel": channel}

    async def load(self, client: httpx.AsyncClient, worker: int, end_s: float) -> None:
        i = worker
        while self.now() < end_s:
            seen = await soak_request(client, self.body(i), self.t0)
            self.seen.append(seen)
            i += self.config.concurrency
            if seen.kind.startswith("503"):
                await asyncio.sleep(RETRY_AFTER_S)  # a well-behaved client honours Retry-After

    async def sample_rss(self, end_s: float) -> None:
        assert self.up is not None
        while self.now() < end_s:
            for name, pid in service_pids(self.up.pid).items():
                mb = rss_mb(pid)
                if mb is not None:
                    self.rss.append((self.now(), name, pid, mb))
            await asyncio.sleep(5.0)

    async def inject(self, client: httpx.AsyncClient, end_s: float) -> None:
        assert self.up is not None
        span = end_s - self.config.warmup_s
        plan = [("edge killed", 0.15), ("channel killed", 0.35), ("delay spike", 0.55), ("bad requests", 0.75)]
        for name, frac in plan:
            await asyncio.sleep(max(0.0, self.config.warmup_s + frac * span - self.now()))
            fault = Fault(name, self.now())
            self.faults.append(fault)
            log.info("fault at %.0f s: %s", fault.at_s, name)
            if name.endswith("killed"):
                pid = service_pids(self.up.pid).get(name.split()[0])
                if pid:
                    os.kill(pid, signal.SIGKILL)
            elif name == "bad requests":
                bad = [b"{not json", {"prompt": ""}, {"prompt": "x", "channel": {"model": "awgn"}},
                       {"prompt": "x", "codec_params": {"side_info": "!!"}}, b"\xff" * 100]
                self.seen += await asyncio.gather(*(soak_request(client, bad[j % len(bad)], self.t0)
                                                    for j in range(self.config.bad_burst)))

    async def run(self) -> None:
        end_s = self.config.warmup_s + 60.0 * self.config.minutes
        limits = httpx.Limits(max_connections=self.config.concurrency + self.config.bad_burst)
        async with httpx.AsyncClient(base_url=self.url, timeout=120.0, limits=limits) as client:
            await asyncio.gather(self.sample_rss(end_s), self.inject(client, end_s),
                                 *(self.load(client, w, end_s) for w in range(self.config.concurrency)))
        recovery_times(self.seen, self.faults)


def recovery_times(seen: list[Seen], faults: list[Fault]) -> None:
    """Per fault: from the fault to the first success of a request *sent* after it (a request already past
    the edge when the edge dies can still succeed, and says nothing about recovery). A delay spike counts
    from its end."""
    for fault in faults:
        start = fault.at_s + (SPIKE_S if fault.name == "delay spike" else 0.0)
        after = [s.t_s for s in seen if s.outcome == "ok" and s.t_s - s.latency_s >= start]
        fault.recovery_s = (min(after) - fault.at_s) if after else None


def rss_growth(rss: list[tuple[float, str, int, float]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per service: RSS of its last process at its first sample after the warm-up (or its restart), at the
    end, and the relative growth."""
    out: dict[str, dict[str, float]] = {}
    for name in SERVICES:
        samples = [(t, pid, mb) for t, n, pid, mb in rss if n == name and t >= warmup_s]
        if not samples:
            continue
        last_pid = samples[-1][1]
        mine = [(t, mb) for t, pid, mb in samples if pid == last_pid]
        # A restarted process warms up again: measure it from its own warm-up's end.
        start = next((mb for t, mb in mine if t >= mine[0][0] + warmup_s), mine[0][1])
        out[name] = {"start_mb": start, "end_mb": mine[-1][1], "growth": mine[-1][1] / start - 1.0}
    return out


def summary(run: SoakRun) -> dict[str, Any]:
    counts = {k: sum(1 for s in run.seen if s.outcome == k) for k in ("ok", "refused", "lost")}
    kinds: dict[str, int] = {}
    for s in run.seen:
        if s.outcome != "ok":
            kinds[f"{s.outcome}: {s.kind}"] = kinds.get(f"{s.outcome}: {s.kind}", 0) + 1
    return {"config": {k: str(v) for k, v in asdict(run.config).items()}, "requests": len(run.seen), **counts,
            "by_kind": kinds, "faults": [asdict(f) for f in run.faults],
            "rss": rss_growth(run.rss, run.config.warmup_s), "host": platform.node(), "cpus": os.cpu_count()}


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f}"


def write_results(run: SoakRun, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    s = summary(run)
    (out / "soak.json").write_text(json.dumps(s, indent=2) + "\n")
    with (out / "soak.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "outcome", "kind", "latency_s"])
        for x in run.seen:
            w.writerow([f"{x.t_s:.2f}", x.outcome, x.kind, f"{x.latency_s:.3f}"])
    lines = [f"# Soak: {run.config.minutes:g} min at {run.config.concurrency} concurrent requests, injected faults",
             "", "Rerun: `meg bench soak` (`--minutes N` for a shorter run).", "",
             f"Requests {s['requests']}: **{s['ok']} ok, {s['refused']} clean refusals, {s['lost']} lost**.", "",
             "| fault | at (s) | recovery (s): to the first success of a request sent after the fault |",
             "|---|---|---|"]
    lines += [f"| {f['name']} | {f['at_s']:.0f} | {_seconds(f['recovery_s'])} |" for f in s["faults"]]
    lines += ["", f"| service | RSS after warm-up (MB) | at the end (MB) | growth (goal ≤ {GOAL_RSS_GROWTH:.0%}) |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {r['start_mb']:.0f} | {r['end_mb']:.0f} | {r['growth']:+.1%} |" for n, r in s["rss"].items()]
    lines += ["", "Refusals and losses by kind:", ""] + [f"- {k}: {v}" for k, v in sorted(s["by_kind"].items())]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    plot(run, out / "soak.png")


def plot(run: SoakRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for outcome, colour in (("ok", "tab:green"), ("refused", "tab:orange"), ("lost", "tab:red")):
        pts = [(x.t_s, x.latency_s) for x in run.seen if x.outcome == outcome]
        if pts:
            a.scatter(*zip(*pts), s=6, c=colour, label=outcome)
    for f in run.faults:
        for ax in (a, b):
            ax.axvline(f.at_s, color="grey", ls="--", lw=0.8)
        a.text(f.at_s, a.get_ylim()[1] * 0.9, f.name, rotation=90, fontsize=7, va="top")
    a.set_ylabel("latency (s)")
    a.legend(loc="upper right")
    for name in SERVICES:
        pts = [(t, mb) for t, n, _, mb in run.rss if n == name]
        if pts:
            b.plot(*zip(*pts), label=name)
    b.set_ylabel("RSS (MB)")
    b.set_xlabel("time since start (s)")
    b.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``meg bench soak [--minutes M] [--quick] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("soak", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    minutes = 1.5 if args.quick else args.minutes
    config = SoakConfig(minutes, args.concurrency, args.steps, 20.0 if args.quick else args.warmup_s, out=args.out)
    if args.model_dir is not None:
        config.model_dir = args.model_dir
    run = SoakRun(config)
    try:
        run.start()
        asyncio.run(run.run())
    finally:
        run.stop()
    write_results(run, args.out)
    s = summary(run)
    log.info("soak: %d requests, %d ok, %d refused, %d lost; results in %s", s["requests"], s["ok"], s["refused"],
             s["lost"], args.out)
    return 0 if s["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

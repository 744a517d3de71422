"""Testbed overhead: one request end to end through the three services vs the same model in one process.

``meg bench overhead`` times

* **testbed**: ``POST /v1/generate`` on an otherwise idle testbed (device REST → gRPC → channel emulator →
  gRPC → edge queue → text encoder + denoiser → codec → back → device decoder → PNG), on an ideal channel
  with no propagation delay and a 10 GHz symbol rate, so the simulated airtime is ~0 and what is measured
  is the software path itself;
* **monolithic**: the same pipeline loaded in this process with no network and no codec
  (:func:`models.backends.load_backend` for text encoding + denoising, the device's decoder for
  decoding), same prompt, seed, steps, guidance and decoder.

Both run ``--repetitions`` times after ``--warmup`` runs, interleaved (ABAB...) so machine-load drift hits
both alike; the report gives medians and their ratio (goal: at most 1.10), the per-stage medians the
testbed reports, and the PSNR between the two images (same computation: only the codec's fp16 rounding
separates them). Writes ``overhead.csv``, ``overhead.json``, ``overhead.md`` and ``overhead.png`` into ``--out``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.testbed import LocalTestbed, default_model_dir

log = logging.getLogger("bench.overhead")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GOAL_RATIO = 1.10
#: An ideal link that takes no wall-clock time: the testbed's software overhead alone is measured.
ZERO_AIRTIME_CHANNEL = {"model": "ideal", "bandwidth_hz": 1e10, "delay_ms": 0}


@dataclass
class OverheadConfig:
    repetitions: int = 20
    warmup: int = 3
    steps: int = 20
    seed: int = 1234
    guidance_scale: float = 4.0
    prompt: str = "a red circle on a white background"
    codec: str = "raw-fp16"
    decoder: str = "tiny"
    url: str | None = None
    model_dir: Path = field(default_factory=default_model_dir)
    out: Path = RESULTS_DIR


class Monolith:
    """The model of the testbed in one process: edge backend + device decoder, called directly."""

    def __init__(self, config: OverheadConfig) -> None:
        import torch

        from device_client.decoders import DecoderBank
        from serving.scheduler import default_cpu_threads
        from models.backends import load_backend

        self.config = config
        # The thread count the edge computes with (its default), so both sides run the same arithmetic setup.
        self.cpu_threads = default_cpu_threads()
        torch.set_num_threads(self.cpu_threads)
        self.backend = load_backend(config.model_dir)
        self.decoder = DecoderBank(config.model_dir).get(config.decoder)
        self.shape = self.backend.latent_shape(0, 0)

    def generate(self) -> tuple[float, Any]:
        """(seconds, image (3, H, W) in [0, 1]) for one request."""
        from models.backends import BatchItem

        c = self.config
        started = time.perf_counter()
        result = self.backend.generate([BatchItem(c.prompt, c.seed, c.guidance_scale, threading.Event())],
                                       c.steps, self.shape, 0)
        latents = result.latents[0]
        assert latents is not None
        # The device clips latents the same way before decoding.
        image = self.decoder.decode(latents.unsqueeze(0).clamp(-50.0, 50.0))[0]
        return time.perf_counter() - started, image


def testbed_request(client: httpx.Client, config: OverheadConfig) -> tuple[float, dict[str, Any]]:
    body = {"prompt": config.prompt, "seed": config.seed, "steps": config.steps,
            "guidance_scale": config.guidance_scale, "codec": config.codec, "decoder": config.decoder,
            "channel": ZERO_AIRTIME_CHANNEL}
    started = time.perf_counter()
    resp = client.post("/v1/generate", json=body)
    elapsed = time.perf_counter() - started
    if resp.status_code != 200:
        raise RuntimeError(f"testbed answered {resp.status_code}: {resp.text[:300]}")
    return elapsed, resp.json()


def image_psnr_db(png: bytes, image: Any) -> float:
    from PIL import Image

    received = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0
    local = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8) / 255.0
    mse = float(np.mean((received - local) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def measure(url: str, config: OverheadConfig, monolith: Monolith) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    psnr = None
    with httpx.Client(base_url=url, timeout=600.0) as client:
        for i in range(config.warmup + config.repetitions):
            warm = i < config.warmup
            # Alternate which goes first, so a load spike does not always land on the same side.
            order = ("monolithic", "testbed") if i % 2 == 0 else ("testbed", "monolithic")
            for path in order:
                if path == "monolithic":
                    seconds, image = monolith.generate()
                    rows.append({"rep": i, "warmup": warm, "path": path, "seconds": seconds})
                else:
                    seconds, out = testbed_request(client, config)
                    stages = {f"stage_{k}_ms": v for k, v in out["timings_ms"].items()}
                    rows.append({"rep": i, "warmup": warm, "path": path, "seconds": seconds,
                                 "batch_size": out.get("batch_size"), "airtime_ms": out["airtime_ms"], **stages})
                    if psnr is None:
                        png = client.get(out["image_url"])
                        png.raise_for_status()
                        _, image = monolith.generate()
                        psnr = image_psnr_db(png.content, image)
            log.info("rep %d%s: %s", i, " (warm-up)" if warm else "",
                     ", ".join(f"{r['path']} {r['seconds']:.3f} s" for r in rows[-2:]))
    measured = [r for r in rows if not r["warmup"]]
    mono = np.array([r["seconds"] for r in measured if r["path"] == "monolithic"])
    bed = [r for r in measured if r["path"] == "testbed"]
    bed_s = np.array([r["seconds"] for r in bed])
    stage_keys = sorted({k for r in bed for k in r if k.startswith("stage_")})
    return {
        "rows": rows,
        "monolithic_median_s": float(np.median(mono)), "testbed_median_s": float(np.median(bed_s)),
        "monolithic_min_s": float(np.min(mono)), "testbed_min_s": float(np.min(bed_s)),
        "ratio_median": float(np.median(bed_s) / np.median(mono)),
        "ratio_min": float(np.min(bed_s) / np.min(mono)),
        "overhead_median_ms": float(1e3 * (np.median(bed_s) - np.median(mono))),
        "testbed_stage_medians_ms": {k.removeprefix("stage_").removesuffix("_ms"): float(np.median([r[k] for r in bed]))
                                     for k in stage_keys},
        "image_psnr_db_testbed_vs_monolithic": psnr,
    }


def write_outputs(config: OverheadConfig, result: dict[str, Any], env: dict[str, Any]) -> None:
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    columns = ["rep", "warmup", "path", "seconds", "batch_size", "airtime_ms", "stage_edge_ms", "stage_encode_ms",
               "stage_channel_ms", "stage_decode_ms", "stage_total_ms"]
    with open(out / "overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    psnr = result["image_psnr_db_testbed_vs_monolithic"]
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
               "environment": env, "goal_ratio": GOAL_RATIO, "goal_met": result["ratio_median"] <= GOAL_RATIO,
               **{k: v for k, v in result.items() if k != "rows"},
               "image_psnr_db_testbed_vs_monolithic": psnr if psnr is None or math.isfinite(psnr) else "inf"}
    (out / "overhead.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(result, out / "overhead.png")
    stages = result["testbed_stage_medians_ms"]
    verdict = "meets" if result["ratio_median"] <= GOAL_RATIO else "does not meet"
    md = ["# Testbed overhead (`meg bench overhead`)", "",
          f"One request at a time, {config.repetitions} repetitions after {config.warmup} warm-up runs, "
          f"interleaved; {config.steps} steps, seed {config.seed}, guidance {config.guidance_scale:g}, codec "
          f"`{config.codec}`, decoder `{config.decoder}`, ideal channel with zero airtime "
          f"(bandwidth 10 GHz, no delay). Model `{config.model_dir.name}`.",
          f"Machine: {env['cpus']} CPUs, torch {env['torch']}, load average at start "
          f"{', '.join(f'{x:.1f}' for x in env['load_average'] or [])}; the monolith computes with "
          f"{env['monolith_cpu_threads']} torch thread(s), the edge's default.", "",
          "| path | median (s) | min (s) |", "|---|---|---|",
          f"| monolithic (one process, no network) | {result['monolithic_median_s']:.3f} | "
          f"{result['monolithic_min_s']:.3f} |",
          f"| testbed (REST + 2 gRPC hops + codec) | {result['testbed_median_s']:.3f} | "
          f"{result['testbed_min_s']:.3f} |", "",
          f"Ratio of medians testbed / monolithic: **{result['ratio_median']:.3f}x** ({verdict} the "
          f"{GOAL_RATIO:.2f}x goal); ratio of minima {result['ratio_min']:.3f}x; median overhead "
          f"{result['overhead_median_ms']:.0f} ms.", "",
          "Testbed stage medians (ms, as the device reports them): "
          + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + ".", "",
          f"Image PSNR testbed vs monolithic: {_db(psnr)} dB "
          "(only the fp16 rounding of the latents separates them).", ""]
    (out / "overhead.md").write_text("\n".join(md))


def _db(value: float | None) -> str:
    return "n/a" if value is None else ("inf" if math.isinf(value) else f"{value:.1f}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in result["rows"] if not r["warmup"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    data = [[r["seconds"] for r in measured if r["path"] == p] for p in ("monolithic", "testbed")]
    ax.boxplot(data)
    ax.set_xticks([1, 2], ["monolithic", "testbed"])
    ax.set_ylabel("latency of one request (s)")
    ax.set_title(f"Testbed / monolithic median: {result['ratio_median']:.3f}x")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment() -> dict[str, Any]:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    """``meg bench overhead [--quick] [--url URL] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("overhead", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    quick = args.quick
    config = OverheadConfig(
        repetitions=args.repetitions or (3 if quick else 20),
        warmup=args.warmup if args.warmup is not None else (1 if quick else 3),
        steps=args.steps or (4 if quick else 20), seed=args.seed, codec=args.codec, decoder=args.decoder,
        url=args.url, model_dir=args.model_dir or default_model_dir(), out=args.out)
    monolith = Monolith(config)
    env = {**environment(), "monolith_cpu_threads": monolith.cpu_threads}
    if config.url:
        result = measure(config.url, config, monolith)
    else:
        with LocalTestbed(config.model_dir) as bed:
            result = measure(bed.url, config, monolith)
    write_outputs(config, result, env)
    log.info("testbed %.3f s vs monolithic %.3f s (medians): %.3fx (goal <= %.2fx); wrote %s/overhead.*",
             result["testbed_median_s"], result["monolithic_median_s"], result["ratio_median"], GOAL_RATIO,
             config.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

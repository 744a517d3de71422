"""``meg bench llm``: the split language model, measured → ``bench/results/llm.{csv,json,md,png}``.

Parts (``--parts``):

* ``rate`` (:mod:`bench.llm_rate`): answer accuracy on held-out prompts, next-token agreement with the
  uncoded model and hidden-state PSNR against bits per hidden value, every hidden-state codec, at k = 1 and
  k = L/2;
* ``snr`` (:mod:`bench.llm_rate`): accuracy from −10 to 20 dB on AWGN and Rayleigh, digital codecs over
  LDPC + QAM against analog and the learned JSCC;
* ``speed`` (:mod:`bench.llm_speed`): TTFT/TPOT through the testbed against the same model in one process,
  and tokens/s at 1, 8, 16 and 32 sessions with decode batching on and off.
"""

from __future__ import annotations

import csv
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench.cli import parse
from bench.llm_speed import SpeedConfig, run_speed

log = logging.getLogger("bench.llm")

DEFAULT_LLM_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes_llm_v1"
TPOT_GOAL = 1.5
BATCHING_GOAL = 2.0


def main(argv: list[str] | None = None) -> int:
    args = parse("llm", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    llm_dir = args.llm_dir or DEFAULT_LLM_DIR
    prompts = args.prompts or (24 if args.quick else 200)
    started = time.time()
    rows: list[dict[str, Any]] = []
    if "rate" in args.parts or "snr" in args.parts:
        from bench import llm_rate

        if "rate" in args.parts:
            rows += [{"part": "rate", **r} for r in llm_rate.run_rate(llm_dir, n_prompts=prompts)]
            rows += [{"part": "outliers", **r} for r in llm_rate.run_outliers(llm_dir)]
        if "snr" in args.parts:
            snrs = (0.0, 10.0) if args.quick else llm_rate.SNRS_DB
            rows += [{"part": "snr", **r} for r in llm_rate.run_snr(llm_dir, n_prompts=max(4, prompts // 5),
                                                                       snrs_db=snrs)]
    if "speed" in args.parts:
        speed = SpeedConfig(llm_dir, tokens=args.tokens or 32, requests=args.requests or (3 if args.quick else 10),
                            warmup=1 if args.quick else 2, rounds=1 if args.quick else 2)
        rows += run_speed(speed)
    rows = kept_rows(Path(args.out), args.parts) + rows
    env = {"host": platform.node(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
           "minutes": (time.time() - started) / 60, "llm_dir": str(llm_dir), "prompts": prompts}
    write_outputs(Path(args.out), rows, env)
    return 0


#: The row kinds each part writes.
PART_ROWS = {"rate": ("rate", "outliers"), "snr": ("snr",), "speed": ("latency", "throughput")}


def kept_rows(out: Path, parts: list[str]) -> list[dict[str, Any]]:
    """Rows of the parts not run now, from the last report in ``out`` (so one part can be rerun alone)."""
    previous = out / "llm.json"
    if not previous.is_file():
        return []
    rerun = {kind for part in parts for kind in PART_ROWS[part]}
    return [r for r in json.loads(previous.read_text())["rows"] if r.get("part") not in rerun]


def write_outputs(out: Path, rows: list[dict[str, Any]], env: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(out / "llm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "llm.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1, default=str))
    (out / "llm.md").write_text(markdown(rows, env))
    plot(rows, out / "llm.png")
    log.info("wrote %s", out / "llm.md")


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key, "")
            cells.append(format(value, fmt) if isinstance(value, (int, float)) and fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# Split LLM benchmark (`meg bench llm`)", "",
             f"Host {env['host']}, torch {env['torch']}, {env['cpu_threads']} CPU threads; took "
             f"{env['minutes']:.1f} min. Model: `{env['llm_dir']}`. Rerun: `meg bench llm`.", ""]
    parts = {name: [{k: v for k, v in r.items() if k != "part"} for r in rows if r["part"] == name]
             for name in ("rate", "snr", "outliers")}
    if any(parts.values()):
        from bench.llm_rate import report_sections

        lines += report_sections(parts["rate"], parts["snr"], parts["outliers"]) + [""]
    lat = [r for r in rows if r["part"] == "latency"]
    if lat:
        lines += ["## Latency: one session at a time, testbed against one process", "",
                  f"Goal: TPOT ≤ {TPOT_GOAL}× the monolithic model on the zero-airtime, 0 ms link. Medians.", ""]
        lines += _table(lat, [("model", "model", ""), ("link", "link", ""), ("codec", "codec", ""), ("ttft_ms", "TTFT ms", ".1f"),
                              ("mono_ttft_ms", "mono TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
                              ("mono_tpot_ms", "mono TPOT ms", ".2f"), ("tpot_ratio", "TPOT ratio", ".2f"),
                              ("bits_per_token", "bits/token", ".0f"),
                              ("symbols_per_token", "channel uses/token", ".0f")]) + [""]
    thr = [r for r in rows if r["part"] == "throughput"]
    if thr:
        lines += ["## Throughput: output tokens/s against concurrent sessions", "",
                  f"Goal: batching on ≥ {BATCHING_GOAL}× off at 16 sessions.", ""]
        by = {(r["batching"], r["sessions"]): r["tokens_per_s"] for r in thr}
        sessions = sorted({r["sessions"] for r in thr})
        lines += ["| sessions | batching on | batching off | on/off |", "|---|---|---|---|"]
        for n in sessions:
            on, off = by.get(("on", n)), by.get(("off", n))
            ratio = f"{on / off:.2f}" if on and off else ""
            lines.append(f"| {n} | {on or 0:.1f} | {off or 0:.1f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    # Digital codecs only: an analog codec's cost is channel uses, not bits (see the md's symbols_per_value).
    rate = [r for r in rows if r["part"] == "rate" and r.get("kind") == "digital"]
    for k in sorted({r.get("split_layer") for r in rate if r.get("split_layer") is not None}):
        pts = sorted((r["bits_per_value"], r["accuracy"], r["codec"]) for r in rate if r.get("split_layer") == k)
        axes[0].scatter([p[0] for p in pts], [p[1] for p in pts], label=f"k={k}")
        for x, y, name in pts:
            axes[0].annotate(name, (x, y), fontsize=6)
    axes[0].set(xscale="log", xlabel="bits per hidden value", ylabel="answer accuracy", title="rate (digital codecs)")
    snr = [r for r in rows if r["part"] == "snr"]
    for key in sorted({(r["codec"], r["channel"]) for r in snr}):
        pts = sorted((r["snr_db"], r["accuracy"]) for r in snr if (r["codec"], r["channel"]) == key)
        axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} / {key[1]}")
    axes[1].set(xlabel="SNR (dB)", ylabel="answer accuracy", title="accuracy vs SNR")
    thr = [r for r in rows if r["part"] == "throughput"]
    for mode in ("on", "off"):
        pts = sorted((r["sessions"], r["tokens_per_s"]) for r in thr if r["batching"] == mode)
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batching {mode}")
    axes[2].set(xlabel="concurrent sessions", ylabel="output tokens/s", title="throughput")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())

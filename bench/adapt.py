"""``meg bench adapt``: link adaptation (codec ``auto``) against every fixed scheme, on a static SNR sweep and on
channels that change over time.

Set-up (issue 14):

* **The table** ``auto`` uses is the one installed in the model's image codec set (``adaptation.json``, written
  by ``meg bench snr`` from its 216 held-out latents on a 5 dB grid).
* **Other images**: this benchmark's held-out latents are disjoint from those (the prompts after them), so the
  table is judged out of sample, between its grid points (the sweep's 2.5 dB steps) and beyond them (25 dB).
* **The candidates** are every scheme of the table whose channel uses per image (side information included)
  fit the budget (default 512: half a channel use per latent value, the larger budget of ``meg bench snr``).
  They are the fixed schemes ``auto`` is compared with, and what it chooses among.
* **Paired**: at each (channel, SNR) every candidate sends every image through the same noise stream, as in
  ``meg bench snr`` (:func:`bench.snr.run_grid`, the product's own link and receiver), so ``auto``'s image is
  the chosen scheme's image under the same noise and differences are paired.
* **Estimation error**: per image the receiver estimates the SNR from pilots (:meth:`radio.link.Link.probe`
  with ``csi: "estimated"``: 8 pilots in each of 8 blocks, as the emulator does) and ``auto`` chooses at that
  estimate (:meth:`codec.adaptation.AdaptationTable.choose`, the edge's own code). The JSCC links of every
  scheme are conditioned on the true SNR; the estimate only drives the choice. The probe's 64 pilot symbols
  are not charged to ``auto``'s budget here: a receiver tracks the channel across many transmissions, so a
  request's share of them is small (the live emulator does count them in ``symbols_sent``).
* **Channels that change**: named SNR traces (:mod:`radio.trace`), one image per trace step, each step snapped
  to the sweep's grid (so its images are the sweep's). ``auto`` chooses from the estimate of the *previous*
  step: on the live testbed the estimate is taken when the request arrives and the payload leaves after the
  edge's compute and the feedback delay, so it is always a little stale. Every image of the held-out set runs
  the whole trace once (it starts at a different step per pass), and intervals are over passes.

Outputs ``adapt.csv`` (one row per channel, SNR and scheme), ``adapt.json``, ``adapt.md`` and ``adapt.png``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from bench.stats import bootstrap_ci, paired_difference
from bench.snr import Scheme, available_schemes, cell_generator, held_out_latents, load_family, run_grid
from codec.adaptation import TABLE_FILE, AdaptationTable, scheme_of
from codec.image_sets import image_set_dir
from radio import ChannelSpec
from radio.link import Link
from radio.trace import profile_trace

logger = logging.getLogger(__name__)

FULL_SNRS_DB = tuple(float(s) for s in np.arange(-10.0, 25.01, 2.5))
QUICK_SNRS_DB = (-10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
SMOKE_SNRS_DB = (-5.0, 25.0)
CHANNELS = ("awgn", "rayleigh")
TRACES = ("walk-away", "tunnel")
DEFAULT_BUDGET = 512.0
#: Held-out prompts of ``meg bench snr`` come first; this benchmark takes the ones after them.
FIRST_IMAGE = 216
ESTIMATE_STREAM = 7919  # a key that keeps the pilots' noise apart from the data's


@dataclass
class Sweep:
    """Per-image PSNR of every candidate at every (channel, SNR) of the grid: ``psnr[channel][scheme]`` is an
    array (SNRs, images)."""

    snrs: tuple[float, ...]
    schemes: list[str]
    psnr: dict[str, dict[str, np.ndarray]]

    def at(self, channel: str, scheme: str, snr: float) -> np.ndarray:
        return self.psnr[channel][scheme][self.snrs.index(snr)]


def bench_scheme(name: str, analog: dict[str, Scheme]) -> Scheme | None:
    """The :class:`bench.snr.Scheme` that sends table scheme ``name`` (None when its pieces are missing)."""
    if name in analog:
        return analog[name]
    parsed = scheme_of(name)
    if parsed is None:
        return None
    codec_name, link, params = parsed
    fec = str(link.get("fec", "none"))
    rate = str(Fraction(float(link.get("code_rate", 0.5))).limit_denominator(16))
    return Scheme(name, codec_name, "tiny_decoder", "ldpc" if fec == "ldpc" else "uncoded",
                  str(link.get("modulation", "qpsk")), rate, params=dict(params))


def candidates(table: AdaptationTable, channel: str, budget: float) -> list[str]:
    """Names of the table's schemes for ``channel`` that fit ``budget`` channel uses per image."""
    return [s.name for s in table.channels.get(channel, []) if s.symbols <= budget]


def estimates(link: Link, channel: str, snr: float, n: int, seed: int, key: int) -> np.ndarray:
    """``n`` independent pilot-based SNR estimates of a ``channel`` link at ``snr`` (one per request)."""
    spec = ChannelSpec.create(channel, snr_db=snr, csi="estimated")
    gen = cell_generator(seed, ESTIMATE_STREAM, key)
    return np.array([link.probe(spec, gen)[0] for _ in range(n)], dtype=np.float64)


def auto_pick(table: AdaptationTable, channel: str, estimate_db: np.ndarray, budget: float) -> list[str]:
    """The scheme ``auto`` chooses at each estimate (the edge's own choice)."""
    return [table.choose(channel, float(e), budget).scheme.name for e in estimate_db]


def sweep_rows(sweep: Sweep, table: AdaptationTable, channel: str, budget: float, seed: int,
               link: Link) -> list[dict[str, object]]:
    """One row per (SNR, scheme) and one for ``auto`` with its paired difference to the best fixed scheme."""
    rows: list[dict[str, object]] = []
    for ni, snr in enumerate(sweep.snrs):
        n = sweep.at(channel, sweep.schemes[0], snr).size
        est = estimates(link, channel, snr, n, seed, 1000 * CHANNELS.index(channel) + ni)
        picks = auto_pick(table, channel, est, budget)
        auto = np.array([sweep.at(channel, name, snr)[i] for i, name in enumerate(picks)])
        means = {name: float(sweep.at(channel, name, snr).mean()) for name in sweep.schemes}
        best = max(means, key=means.__getitem__)
        for name in sweep.schemes:
            lo, hi = bootstrap_ci(sweep.at(channel, name, snr))
            rows.append({"channel": channel, "snr_db": snr, "scheme": name, "psnr_db": means[name],
                         "psnr_ci_low": lo, "psnr_ci_high": hi, "best_fixed": name == best})
        d, dlo, dhi = paired_difference(sweep.at(channel, best, snr), auto)
        lo, hi = bootstrap_ci(auto)
        chosen = {name: picks.count(name) / len(picks) for name in sorted(set(picks))}
        rows.append({"channel": channel, "snr_db": snr, "scheme": "auto", "psnr_db": float(auto.mean()),
                     "psnr_ci_low": lo, "psnr_ci_high": hi, "best_fixed": False, "best_fixed_scheme": best,
                     "minus_best_db": d, "minus_best_ci_low": dlo, "minus_best_ci_high": dhi,
                     "estimate_mean_db": float(est.mean()), "estimate_std_db": float(est.std()),
                     "chosen": json.dumps(chosen)})
    return rows


def trace_rows(sweep: Sweep, table: AdaptationTable, channel: str, profile: str, budget: float, seed: int,
               link: Link) -> tuple[list[dict[str, object]], dict[str, object]]:
    """Mean PSNR over trace ``profile`` for every fixed scheme and ``auto`` (stale estimate), with intervals over
    passes; and the per-step curve of the first pass for the plot."""
    grid = np.array(sweep.snrs)
    steps = [float(grid[np.abs(grid - v).argmin()]) for v in profile_trace(profile)]
    n = sweep.at(channel, sweep.schemes[0], steps[0]).size
    per_pass = {name: np.zeros(n) for name in [*sweep.schemes, "auto"]}
    curve: dict[str, list[float]] = {"snr_db": steps, "auto": []}
    for t, snr in enumerate(steps):
        images = (np.arange(n) + t) % n        # pass p sends image (p + t) mod n at step t
        seen = steps[max(t - 1, 0)]           # the estimate is one step old
        est = estimates(link, channel, seen, n, seed, 100_000 + 1000 * CHANNELS.index(channel) + t)
        picks = auto_pick(table, channel, est, budget)
        auto = np.array([sweep.at(channel, name, snr)[images[p]] for p, name in enumerate(picks)])
        per_pass["auto"] += auto / len(steps)
        curve["auto"].append(float(auto.mean()))
        for name in sweep.schemes:
            per_pass[name] += sweep.at(channel, name, snr)[images] / len(steps)
    rows = []
    best = max(sweep.schemes, key=lambda name: per_pass[name].mean())
    for name, values in per_pass.items():
        lo, hi = bootstrap_ci(values)
        row: dict[str, object] = {"channel": channel, "trace": profile, "scheme": name,
                                  "psnr_db": float(values.mean()), "psnr_ci_low": lo, "psnr_ci_high": hi}
        if name == "auto":
            d, dlo, dhi = paired_difference(per_pass[best], values)
            row.update(best_fixed_scheme=best, minus_best_db=d, minus_best_ci_low=dlo, minus_best_ci_high=dhi)
        rows.append(row)
    curve[best] = [float(sweep.at(channel, best, snr).mean()) for snr in steps]
    return rows, {"channel": channel, "trace": profile, "best_fixed": best, **curve}


def run(out_dir: Path, *, mode: str = "full", n_images: int | None = None, snrs: tuple[float, ...] | None = None,
        channels: tuple[str, ...] = CHANNELS, budget: float = DEFAULT_BUDGET, traces: tuple[str, ...] = TRACES,
        schemes: list[str] | None = None, source: str = "diffusion", model_root: Path | None = None,
        seed: int = 0, jobs: int = 1, progress: bool = True, command: str = "meg bench adapt"
        ) -> dict[str, object]:
    """Run the benchmark and write ``adapt.{csv,json,md,png}`` under ``out_dir``."""
    from models import DEFAULT_MODEL_DIR

    t0 = time.monotonic()
    root = model_root or DEFAULT_MODEL_DIR
    table = AdaptationTable.load(image_set_dir(root) / TABLE_FILE)
    family = load_family(root)
    n = n_images or {"full": 64, "quick": 16, "smoke": 3}[mode]
    snr_list = snrs or {"full": FULL_SNRS_DB, "quick": QUICK_SNRS_DB, "smoke": SMOKE_SNRS_DB}[mode]
    held = held_out_latents(family, n, source, start=FIRST_IMAGE)
    analog = {s.name: s for s in available_schemes(family)}
    names = sorted({name for ch in channels for name in candidates(table, ch, budget)
                    if schemes is None or any(name.startswith(p) for p in schemes)})
    chosen = [s for s in (bench_scheme(name, analog) for name in names) if s is not None]
    if not chosen:
        raise SystemExit(f"meg bench adapt: no scheme of the table fits {budget:g} channel uses")
    logger.info("bench adapt: %d latents, %d candidate schemes within %g channel uses, SNRs %s", n, len(chosen),
                budget, snr_list)
    per_image = {(r["channel"], r["scheme"], r["snr_db"]): r["_psnr"]
                 for r in run_grid(family, held, chosen, channels, snr_list, seed, progress, None, jobs)}
    sweep = Sweep(snr_list, [s.name for s in chosen],
                  {ch: {s.name: np.stack([per_image[(ch, s.name, snr)] for snr in snr_list]) for s in chosen}
                   for ch in channels})
    link = Link()
    # Restrict the table to the candidates the benchmark could send (a --schemes filter narrows both).
    table = AdaptationTable(table.metric, {ch: [s for s in table.channels.get(ch, []) if s.name in sweep.schemes]
                                           for ch in channels}, table.margin_db, table.estimate_std_db)
    rows = [r for ch in channels for r in sweep_rows(sweep, table, ch, budget, seed, link)]
    trace_out, curves = [], []
    for ch in channels:
        for profile in traces:
            r, c = trace_rows(sweep, table, ch, profile, budget, seed, link)
            trace_out += r
            curves.append(c)
    meta = {"mode": mode, "n_images": n, "first_image": FIRST_IMAGE, "source": held.source, "model": root.name,
            "budget": budget, "snrs": list(snr_list), "channels": list(channels), "traces": list(traces),
            "margin_db": table.margin_db, "estimate_std_db": table.estimate_std_db, "seed": seed, "jobs": jobs,
            "command": command, "seconds": time.monotonic() - t0}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "adapt.csv", "json": out_dir / "adapt.json", "md": out_dir / "adapt.md",
             "png": out_dir / "adapt.png"}
    _write_csv(rows, paths["csv"])
    paths["json"].write_text(json.dumps({"meta": meta, "sweep": rows, "traces": trace_out, "curves": curves},
                                        indent=1))
    paths["md"].write_text("\n".join(report(rows, trace_out, meta)) + "\n")
    plot(rows, curves, channels, paths["png"])
    logger.info("bench adapt: wrote %s in %.0f s", ", ".join(str(p) for p in paths.values()), meta["seconds"])
    return {"rows": rows, "traces": trace_out, "meta": meta, **paths}


def _write_csv(rows: list[dict[str, object]], path: Path) -> None:
    import csv

    columns = ["channel", "snr_db", "scheme", "psnr_db", "psnr_ci_low", "psnr_ci_high", "best_fixed",
               "best_fixed_scheme", "minus_best_db", "minus_best_ci_low", "minus_best_ci_high", "estimate_mean_db",
               "estimate_std_db", "chosen"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def verdicts(rows: list[dict[str, object]], traces: list[dict[str, object]]) -> dict[str, object]:
    """The issue's three tests, computed: auto within 0.3 dB of the best fixed scheme at every SNR, above every
    fixed scheme on the sweep's average, above every fixed scheme on each trace."""
    out: dict[str, object] = {}
    for ch in sorted({str(r["channel"]) for r in rows}):
        autos = [r for r in rows if r["channel"] == ch and r["scheme"] == "auto"]
        worst = min(autos, key=lambda r: float(r["minus_best_db"]))  # type: ignore[arg-type]
        fixed = {str(r["scheme"]) for r in rows if r["channel"] == ch and r["scheme"] != "auto"}
        avg = {name: float(np.mean([float(r["psnr_db"]) for r in rows  # type: ignore[arg-type]
                                    if r["channel"] == ch and r["scheme"] == name])) for name in fixed}
        auto_avg = float(np.mean([float(r["psnr_db"]) for r in autos]))  # type: ignore[arg-type]
        best_avg = max(avg, key=avg.__getitem__)
        out[ch] = {"worst_minus_best_db": float(worst["minus_best_db"]), "worst_at_db": float(worst["snr_db"]),
                   "within_0_3_db_everywhere": float(worst["minus_best_db"]) >= -0.3,
                   "auto_average_db": auto_avg, "best_fixed_average": best_avg,
                   "best_fixed_average_db": avg[best_avg], "above_every_fixed_on_average": auto_avg > avg[best_avg]}
    for t in traces:
        if t["scheme"] == "auto":
            out[f"{t['channel']}/{t['trace']}"] = {
                "auto_db": float(t["psnr_db"]), "best_fixed": t["best_fixed_scheme"],
                "minus_best_db": float(t["minus_best_db"]), "ci": [float(t["minus_best_ci_low"]),
                                                                 float(t["minus_best_ci_high"])],
                "beats_every_fixed": float(t["minus_best_db"]) > 0}
    return out


def report(rows: list[dict[str, object]], traces: list[dict[str, object]], meta: dict[str, object]) -> list[str]:
    snrs = [float(s) for s in meta["snrs"]]  # type: ignore[union-attr]
    spread = ", ".join(f"{k} ±{v:g} dB" for k, v in meta["estimate_std_db"].items()) or \
        f"none: digital schemes judged {meta['margin_db']:g} dB lower"  # type: ignore[union-attr]
    lines = ["# `meg bench adapt`: link adaptation against every fixed scheme", "",
             f"Mode {meta['mode']}: {meta['n_images']} held-out diffusion latents of `{meta['model']}` (prompts "
             f"{meta['first_image']}… of the held-out set, disjoint from the {meta['first_image']} that "
             f"`meg bench snr` measured the table on), budget {meta['budget']:g} channel uses per image (side "
             f"information included), each scheme judged by its expected quality over the estimate's spread "
             f"({spread}), "
             f"{meta['seconds']:.0f} s with {meta['jobs']} worker processes.", "",
             f"Reproduce: `{meta['command']}`. The set-up is in the module docstring of `bench/adapt.py`: the "
             "table auto uses is the codec set's `adaptation.json`; each image's SNR estimate comes from pilots "
             "(8 × 8 pilot symbols, csi estimated); every scheme sees the same noise on the same images, so "
             "`auto − best` is paired (95 % bootstrap interval over images).", ""]
    v = verdicts(rows, traces)
    lines += ["## Verdict", ""]
    for key, val in v.items():
        if "/" in key:
            lines.append(f"- {key} trace: auto {val['auto_db']:.2f} dB vs the best fixed scheme "  # type: ignore[index]
                         f"({val['best_fixed']}) {val['minus_best_db']:+.2f} dB "  # type: ignore[index]
                         f"[{val['ci'][0]:+.2f}, {val['ci'][1]:+.2f}]: "  # type: ignore[index]
                         f"{'beats every fixed scheme' if val['beats_every_fixed'] else 'does NOT beat every fixed scheme'}.")  # type: ignore[index]
        else:
            lines.append(f"- {key} sweep: worst auto − best fixed {val['worst_minus_best_db']:+.2f} dB at "  # type: ignore[index]
                         f"{val['worst_at_db']:g} dB ({'within' if val['within_0_3_db_everywhere'] else 'NOT within'} "  # type: ignore[index]
                         f"0.3 dB everywhere); average over the sweep auto {val['auto_average_db']:.2f} dB vs the best "  # type: ignore[index]
                         f"fixed {val['best_fixed_average']} {val['best_fixed_average_db']:.2f} dB "  # type: ignore[index]
                         f"({'above' if val['above_every_fixed_on_average'] else 'NOT above'} every fixed scheme).")  # type: ignore[index]
    for ch in meta["channels"]:  # type: ignore[union-attr]
        lines += ["", f"## {ch.upper()}: PSNR (dB) per SNR", "",
                  "| scheme | " + " | ".join(f"{s:g}" for s in snrs) + " | mean |", "|---|" + "---:|" * (len(snrs) + 1)]
        names = sorted({str(r["scheme"]) for r in rows if r["channel"] == ch and r["scheme"] != "auto"})
        for name in [*names, "auto"]:
            cells = []
            for s in snrs:
                r = next(r for r in rows if r["channel"] == ch and r["scheme"] == name and r["snr_db"] == s)
                mark = "**" if r.get("best_fixed") else ""
                cells.append(f"{mark}{float(r['psnr_db']):.2f}{mark}")  # type: ignore[arg-type]
            mean = np.mean([float(c.strip("*")) for c in cells])
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.2f} |")
        lines += ["", "auto − best fixed scheme (bold above), paired, dB [95 %]; what auto chose; the estimate "
                  "(mean ± std):", "", "| SNR | best fixed | auto − best | chosen | estimate |", "|---:|---|---:|---|---|"]
        for s in snrs:
            r = next(r for r in rows if r["channel"] == ch and r["scheme"] == "auto" and r["snr_db"] == s)
            chosen = ", ".join(f"{k} {100 * v:.0f} %" for k, v in json.loads(str(r["chosen"])).items())
            lines.append(f"| {s:g} | {r['best_fixed_scheme']} | {float(r['minus_best_db']):+.2f} "  # type: ignore[arg-type]
                         f"[{float(r['minus_best_ci_low']):+.2f}, {float(r['minus_best_ci_high']):+.2f}] | "  # type: ignore[arg-type]
                         f"{chosen} | {float(r['estimate_mean_db']):.1f} ± {float(r['estimate_std_db']):.1f} |")  # type: ignore[arg-type]
    lines += ["", "## Channels that change", "",
              "Each trace of `radio.trace` (one image per step, each step snapped to the sweep's grid); auto "
              "chooses from the previous step's estimate. Mean PSNR over the trace, 95 % interval over passes:", "",
              "| channel | trace | scheme | PSNR (dB) | auto − best fixed |", "|---|---|---|---:|---:|"]
    for t in sorted(traces, key=lambda t: (str(t["channel"]), str(t["trace"]), -float(t["psnr_db"]))):  # type: ignore[arg-type]
        diff = (f"{float(t['minus_best_db']):+.2f} [{float(t['minus_best_ci_low']):+.2f}, "  # type: ignore[arg-type]
                f"{float(t['minus_best_ci_high']):+.2f}]" if t["scheme"] == "auto" else "")  # type: ignore[arg-type]
        lines.append(f"| {t['channel']} | {t['trace']} | {t['scheme']} | {float(t['psnr_db']):.2f} "  # type: ignore[arg-type]
                     f"[{float(t['psnr_ci_low']):.2f}, {float(t['psnr_ci_high']):.2f}] | {diff} |")  # type: ignore[arg-type]
    return lines


def plot(rows: list[dict[str, object]], curves: list[dict[str, object]], channels: tuple[str, ...], path: Path
         ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(channels) + 1, figsize=(5.5 * (len(channels) + 1), 4.2))
    for ax, ch in zip(axes, channels):
        names = sorted({str(r["scheme"]) for r in rows if r["channel"] == ch})
        for name in names:
            pts = sorted((float(r["snr_db"]), float(r["psnr_db"])) for r in rows  # type: ignore[arg-type]
                         if r["channel"] == ch and r["scheme"] == name)
            style = {"color": "black", "linewidth": 2.5, "zorder": 5} if name == "auto" else \
                {"linewidth": 0.8, "alpha": 0.7}
            ax.plot(*zip(*pts), label=name if name == "auto" or "envelope" in name or "q" not in name else None,
                    **style)
        ax.set(xlabel="SNR (dB)", ylabel="PSNR (dB)", title=f"{ch}: auto (bold) vs each fixed scheme")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    ax = axes[-1]
    for c in curves:
        if c["channel"] != channels[0]:
            continue
        ax.plot(c["auto"], label=f"auto, {c['trace']}", linewidth=2)
        ax.plot(c[c["best_fixed"]], linestyle="--", label=f"{c['best_fixed']}, {c['trace']}")  # type: ignore[index]
    ax.set(xlabel="trace step", ylabel="PSNR (dB)", title=f"{channels[0]}: traces, auto vs best fixed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``meg bench adapt [--quick | --smoke] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("adapt", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    run(args.out, mode=mode, n_images=args.n_images, snrs=tuple(args.snrs) if args.snrs else None,
        channels=tuple(args.channels or CHANNELS), budget=args.budget, schemes=args.schemes,
        source=args.source or ("vae" if args.smoke else "diffusion"), seed=args.seed, jobs=args.jobs,
        traces=tuple(args.traces), progress=not args.no_progress,
        command=" ".join(["meg bench adapt", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

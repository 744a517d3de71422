"""Command lines of the benchmarks (``meg bench snr|rate|serve|overhead``) and where they write.

Only the standard library is imported here, so ``meg bench X --help`` answers at once and bad arguments
are refused before a benchmark loads torch. Each benchmark's ``main()`` parses with :func:`build_parser`.

Where results go: a full run writes the committed results in ``bench/results/``; ``--quick`` and
``--smoke`` write under ``bench/results/_tmp/quick/`` (git-ignored), so trying a benchmark never
overwrites what is committed. ``--out`` overrides both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Quick and smoke runs: git-ignored (.gitignore: /bench/results/_tmp/).
QUICK_DIR = RESULTS_DIR / "_tmp" / "quick"

#: One line per benchmark, for ``meg bench --help``.
BENCHMARKS: dict[str, str] = {
    "snr": "image quality and semantics vs SNR: digital + LDPC, MEG (analog), JSCC, E2E-MEG",
    "rate": "rate-quality curves and BD-rate of the learned coders with and without transforms",
    "serve": "load generator on the REST API: throughput, latency percentiles, batching on vs off",
    "overhead": "one request through the testbed vs the same model in one process",
    "soak": "a bounded soak of `meg up` with injected faults: lost requests, recovery times, RSS growth",
    "link": "per-request LDPC time in the channel emulator, chain built per request vs reused",
    "llm": "split LLM: accuracy/agreement/PSNR vs bits per hidden value, accuracy vs SNR, TTFT/TPOT and tokens/s",
    "adapt": "link adaptation: codec auto (pilot SNR estimates) vs every fixed scheme within a channel-use "
             "budget, on an SNR sweep and on SNR traces",
    "universal": "one learned coder across feature sources (image latents, LLM hidden states): per-source vs "
                 "mixed training, with and without DT-UFC, cross-source transfer",
}


def default_out(quick: bool) -> Path:
    """Committed results for a full run, the ignored scratch folder for a quick or smoke run."""
    return QUICK_DIR if quick else RESULTS_DIR


def _out(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: bench/results for a full run, "
                        f"{QUICK_DIR.relative_to(RESULTS_DIR.parent.parent)} with --quick/--smoke)")


def _snr() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench snr", description=BENCHMARKS["snr"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="54 latents, -5..20 dB (a couple of minutes)")
    mode.add_argument("--smoke", action="store_true",
                      help="a handful of VAE-encoded latents at two SNRs (seconds; for tests)")
    _out(p)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--snrs", type=float, nargs="+", default=None, help="SNRs in dB (overrides the mode's)")
    p.add_argument("--channels", nargs="+", default=None, choices=("ideal", "awgn", "rayleigh", "rician"),
                   help="channel models (default: awgn rayleigh)")
    p.add_argument("--schemes", nargs="+", default=None, help="keep schemes whose name or codec starts so")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one scheme each at a time (same rows)")
    p.add_argument("--source", choices=("diffusion", "vae"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def _rate() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench rate", description=BENCHMARKS["rate"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8 held-out latents instead of 48 (a couple of minutes)")
    mode.add_argument("--smoke", action="store_true", help="a handful of VAE-encoded latents (seconds; for tests)")
    _out(p)
    p.add_argument("--n-images", type=int, default=None)
    p.add_argument("--source", choices=("diffusion", "vae"), default=None,
                   help="held-out latents: what the edge sends (diffusion, default) or VAE means of renders")
    p.add_argument("--curves", nargs="+", default=None, help="codec presets to measure (default: all)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _serve() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench serve", description=BENCHMARKS["serve"])
    p.add_argument("--url", default=None, help="drive a running testbed's device (default: start one per mode)")
    p.add_argument("--requests", type=int, default=None, help="requests per mode (default 200; --quick 16)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 32; --quick 4)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per request (default 20; --quick 4)")
    p.add_argument("--codec", default="raw-fp16")
    p.add_argument("--max-batch", type=int, default=8, help="edge --max-batch with batching on")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="edge --batch-window-ms with batching on")
    p.add_argument("--warmup", type=int, default=None, help="uncounted warm-up requests per mode (default 8)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="client timeout per request")
    p.add_argument("--model-dir", type=Path, default=None)
    _out(p)
    p.add_argument("--quick", action="store_true", help="16 requests at concurrency 4, 4 steps (a smoke test)")
    loop = p.add_argument_group("open loop", "--open-loop: Poisson arrivals at a fraction of the capacity, the "
                                "edge's step scheduler vs request-level batching (bench/results/serve_open_loop.*)")
    loop.add_argument("--open-loop", action="store_true", help="run the open-loop comparison instead")
    loop.add_argument("--load", type=float, default=0.7, help="arrival rate as a fraction of the capacity")
    loop.add_argument("--rate", type=float, default=None, help="fixed arrival rate in req/s (skips the capacity run)")
    loop.add_argument("--capacity-requests", type=int, default=None, help="default 160; --quick 16")
    loop.add_argument("--capacity-concurrency", type=int, default=None, help="default 32; --quick 4")
    loop.add_argument("--seed", type=int, default=0, help="of the arrival times")
    loop.add_argument("--segments", type=int, default=None, help="parts run in ABBA order (default 10; --quick 2)")
    return p


def _overhead() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench overhead", description=BENCHMARKS["overhead"])
    p.add_argument("--url", default=None, help="a running testbed's device (default: start one)")
    p.add_argument("--repetitions", type=int, default=None, help="measured runs per path (default 20; --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="uncounted runs per path first (default 3; --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --quick 4)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--codec", default="raw-fp16")
    p.add_argument("--decoder", default="tiny", choices=["tiny", "robust", "vae"])
    p.add_argument("--model-dir", type=Path, default=None)
    _out(p)
    p.add_argument("--quick", action="store_true", help="3 repetitions of 4 steps (a smoke test)")
    return p


def _soak() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench soak", description=BENCHMARKS["soak"])
    p.add_argument("--minutes", type=float, default=20.0, help="soak length after the warm-up (default 20)")
    p.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2: moderate load)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    p.add_argument("--warmup-s", type=float, default=30.0, help="seconds before faults and RSS baselines")
    p.add_argument("--model-dir", type=Path, default=None)
    _out(p)
    p.add_argument("--quick", action="store_true", help="a 1.5-minute soak (results under bench/results/_tmp)")
    return p


def _link() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench link", description=BENCHMARKS["link"])
    p.add_argument("--repeats", type=int, default=20)
    _out(p)
    p.add_argument("--quick", action="store_true", help="5 repeats")
    return p


def _llm() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench llm", description=BENCHMARKS["llm"])
    p.add_argument("--parts", nargs="+", choices=("rate", "snr", "speed"), default=["rate", "snr", "speed"],
                   help="which parts to run (default: all)")
    p.add_argument("--llm-dir", type=Path, default=None, help="default: the embedded models/shapes_llm_v1")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts per point (default 200; --quick 24)")
    p.add_argument("--tokens", type=int, default=None, help="answer length of the speed part (default 32)")
    p.add_argument("--requests", type=int, default=None, help="timed requests per link (default 10; --quick 3)")
    _out(p)
    p.add_argument("--quick", action="store_true", help="few prompts, few requests (results under _tmp)")
    return p


def _universal() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench universal", description=BENCHMARKS["universal"])
    p.add_argument("--steps", type=int, default=None, help="training steps per coder (default 4000; --quick 30)")
    p.add_argument("--jobs", type=int, default=2, help="training processes (one thread each)")
    p.add_argument("--prompts", type=int, default=None, help="held-out LLM prompts (default 200; --quick 8)")
    p.add_argument("--n-images", type=int, default=None, help="held-out image latents (default 128; --quick 8)")
    p.add_argument("--coders", nargs="+", default=None,
                   help="only these coders, named <domain>@<trained on> (e.g. fcm@image dtufc@mixed)")
    p.add_argument("--retrain", action="store_true", help="retrain cached coders")
    p.add_argument("--cache-dir", type=Path, default=None, help="trained coders (default ~/.cache/meg/universal)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild universal.md/.png from universal.json in --out (no training, no evaluation)")
    p.add_argument("--no-progress", action="store_true")
    _out(p)
    p.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, few prompts and images")
    return p


def _adapt() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg bench adapt", description=BENCHMARKS["adapt"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="16 latents, 5 dB steps (a few minutes)")
    mode.add_argument("--smoke", action="store_true", help="3 VAE-encoded latents at -5 and 25 dB (for tests)")
    p.add_argument("--n-images", type=int, default=None, help="held-out latents (default 64)")
    p.add_argument("--snrs", type=float, nargs="+", default=None, help="SNR grid in dB (default -10..25 by 2.5)")
    p.add_argument("--channels", nargs="+", default=None, choices=("awgn", "rayleigh", "rician"))
    p.add_argument("--budget", type=float, default=512.0, help="channel uses per image, side information included")
    p.add_argument("--traces", nargs="+", default=["walk-away", "tunnel"], help="named SNR traces (radio.trace)")
    p.add_argument("--schemes", nargs="+", default=None, help="keep table schemes whose name starts so")
    p.add_argument("--source", choices=("diffusion", "vae"), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one scheme each at a time (same rows)")
    p.add_argument("--no-progress", action="store_true")
    _out(p)
    return p


_PARSERS = {"adapt": _adapt, "universal": _universal, "snr": _snr, "rate": _rate, "serve": _serve, "overhead": _overhead, "soak": _soak, "link": _link, "llm": _llm}


def build_parser(which: str) -> argparse.ArgumentParser:
    """The argument parser of benchmark ``which`` (a key of :data:`BENCHMARKS`)."""
    return _PARSERS[which]()


def parse(which: str, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv`` for ``which`` and fill ``out``: the committed folder only for a full run."""
    args = build_parser(which).parse_args(argv)
    if args.out is None:
        args.out = default_out(bool(getattr(args, "quick", False) or getattr(args, "smoke", False)))
    return args

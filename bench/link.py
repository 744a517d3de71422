"""``meg bench link``: what one request's LDPC link costs the channel emulator, with the digital chain built per
request (as the emulator did before) and reused across requests (what :class:`radio.link.Link` does now).

Writes ``link.{json,md}`` into ``--out``. Median of ``--repeats`` requests, one torch thread.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from radio import ChannelSpec
from radio.link import Link
from wire.payload import EncodedPayload, TensorInfo

log = logging.getLogger("bench.link")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def measure(repeats: int, payload_bytes: int = 700) -> dict[str, float]:
    data = np.random.default_rng(0).integers(0, 256, payload_bytes, dtype=np.uint8).tobytes()
    payload = EncodedPayload("digital", [TensorInfo("latents", (1, 4, 16, 16))], {}, data=data)
    spec = ChannelSpec.create("awgn", snr_db=5.0, fec="ldpc", code_rate=0.5)
    Link().send(spec, payload)  # import Sionna once, outside the timings
    shared = Link()
    shared.send(spec, payload)
    per_request, reused = [], []
    for i in range(repeats):
        t = time.perf_counter()
        Link().send(spec, payload, torch.Generator().manual_seed(i))
        per_request.append(time.perf_counter() - t)
        t = time.perf_counter()
        shared.send(spec, payload, torch.Generator().manual_seed(i))
        reused.append(time.perf_counter() - t)
    return {"payload_bytes": payload_bytes, "repeats": repeats,
            "chain_per_request_ms": 1e3 * statistics.median(per_request),
            "chain_reused_ms": 1e3 * statistics.median(reused)}


def main(argv: list[str] | None = None) -> int:
    """``meg bench link [--repeats N] [--quick] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("link", argv)
    if args.quick:
        args.repeats = 5
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(1)
    result = measure(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "link.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "link.md").write_text(
        "# Per-request LDPC link time in the channel emulator\n\n"
        f"{result['payload_bytes']}-byte payload, QPSK, LDPC rate 1/2, AWGN 5 dB, median of {result['repeats']} "
        "requests, one torch thread. Rerun: `meg bench link`.\n\n"
        "| digital chain | ms per request |\n|---|---|\n"
        f"| built per request (before) | {result['chain_per_request_ms']:.0f} |\n"
        f"| reused across requests (`radio.link.Link`) | {result['chain_reused_ms']:.0f} |\n")
    log.info("LDPC link: %.0f ms per request with a new chain, %.0f ms reused", result["chain_per_request_ms"],
             result["chain_reused_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rate, fidelity and SNR curves of the hidden-state codecs on the embedded LLM split at layer k.

Why: the split LLM sends its hidden states over the air; what matters is whether the device still answers
correctly and at what rate. Every number goes through the product's own code: the codec registry (the
``llm-hidden`` presets and their fitted sets, :func:`codec.hidden_sets.codec_set_dir`), the split halves
(:func:`models.llm.split.split_generate`) and, for the SNR curves, :class:`radio.link.Link` (what the channel
emulator applies to a request) with the device's damage rule (:func:`device_client.receiver.link_may_have_damaged`).

Functions (each returns a list of plain dict rows; ``bench/llm.py`` composes them with the testbed's speed):

* :func:`run_rate`: per codec and split layer: greedy answer accuracy on held-out prompts, teacher-forced
  next-token agreement with the uncoded model over prompt + answer texts (every position), hidden-state PSNR
  (peak = max |h| over the clean hidden states of the evaluation texts at that k, stated in the row), and the
  rate of the generation traffic (prefill + every decode step): bits per hidden value (payload + counted side
  information) and complex symbols per value (analog codecs);
* :func:`run_snr`: greedy accuracy versus SNR over AWGN and Rayleigh: digital codecs through CRC + 5G LDPC +
  QPSK (rate 1/2), a payload whose CRC failed and that does not decode is concealed as a zero row block (the
  prior mean of nothing), analog ones (``analog``, ``jscc-hidden``) as symbols, MMSE-equalised;
* :func:`run_outliers`: planted massive activations (dimensions ×1000, a huge first token) through the
  clipping codecs with and without the ``outliers`` side channel.

``python -m bench.llm_rate`` writes ``bench/results/llm_rate.{csv,md}`` (``--quick``: a few prompts).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import codec
from bench.stats import paired_difference
from codec.base import CodecError
from codec.sets import codec_set_dir
from codec.registry import codec_kind
from models.llm import DEFAULT_LLM_DIR

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Codec specs: a preset name, optionally ``:key=value,key=value`` codec params over its defaults.
RATE_CODECS: tuple[str, ...] = (
    "raw-fp32", "raw-fp16", "uint8", "int8-token", "int8-token+ol", "hadamard4", "hadamard4:q_group=64",
    "hadamard4:q_group=32", "hadamard4+ol", "hadamard+rowint:q_bits=3", "fcm-hidden", "fcm-hidden+ol",
    "fcm-hidden:fcm_bits=3", "fcm-hidden:fcm_bits=2", "dtufc-hidden", "dtufc-hidden-16", "dtufc-hidden:dtufc_k=8",
    "analog", "jscc-hidden",
)
#: raw-fp16 is left out by default: its LDPC decoding costs 4x that of the 4-bit codecs for the same curve shape.
SNR_CODECS: tuple[str, ...] = ("int8-token", "hadamard4", "fcm-hidden", "dtufc-hidden-16", "analog", "jscc-hidden")
SNRS_DB: tuple[float, ...] = (-10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0)
SNR_CHANNELS: tuple[str, ...] = ("awgn", "rayleigh")
#: The digital transport of the SNR curves (as the image benchmark's "+ LDPC" schemes).
DIGITAL_LINK = {"modulation": "qpsk", "fec": "ldpc", "code_rate": 0.5}
MAX_NEW_TOKENS = 4
OUTLIER_CODECS: tuple[str, ...] = ("int8-token", "hadamard4", "fcm-hidden")


def parse_codec_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"fcm-hidden:fcm_bits=3"`` → (``"fcm-hidden"``, ``{"fcm_bits": "3"}``)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"codec spec {spec!r}: {item!r} is not key=value")
        params[key] = value
    return name, params


@dataclass
class Traffic:
    """What one codec sent: totals over every payload."""

    bits: int = 0
    symbols: int = 0
    values: int = 0
    payloads: int = 0
    damaged: int = 0  # payloads with a code block that failed its CRC (erased, zero-filled)
    concealed: int = 0  # damaged payloads that did not decode and were replaced by zeros

    def add(self, bits: int, symbols: int, values: int) -> None:
        self.bits += bits
        self.symbols += symbols
        self.values += values
        self.payloads += 1


@dataclass
class CodecLink:
    """The edge → device transfer of hidden states through one codec (and optionally a channel): the
    ``transfer`` callable :func:`models.llm.split.split_generate` takes, with the traffic it counted."""

    spec: str
    weights_dir: Path
    channel: object | None = None  # a radio.spec.ChannelSpec; None: the payload arrives intact
    link: object | None = None  # a radio.link.Link
    generator: torch.Generator | None = None
    traffic: Traffic = field(default_factory=Traffic)

    def __post_init__(self) -> None:
        name, params = parse_codec_spec(self.spec)
        self.name = name
        snr = getattr(self.channel, "snr_db", None)
        if codec_kind(name) == "analog":
            params.setdefault("channel_snr_db", f"{snr if snr is not None else 20.0:g}")
        self.codec = codec.build_codec(name, params, self.weights_dir)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        payload = self.codec.encode({"hidden": h})
        self.traffic.add(payload.bits_sent, payload.symbols_sent, h.numel())
        if self.channel is None:
            return self.codec.decode(payload)["hidden"]
        from device_client.receiver import link_may_have_damaged

        result = self.link.send(self.channel, payload, self.generator)  # type: ignore[union-attr]
        self.traffic.damaged += int(bool(result.erased))
        try:
            return self.codec.decode(result.payload)["hidden"]
        except CodecError:
            if not link_may_have_damaged(self.channel, result.payload, result.erased):  # type: ignore[arg-type]
                raise
            self.traffic.concealed += 1
            return torch.zeros_like(h)


def _split(llm: object, k: int) -> tuple[object, object]:
    from models.llm.split import DeviceHalf, EdgeHalf

    return EdgeHalf(llm.model, k), DeviceHalf(llm.model, k)  # type: ignore[attr-defined]


def _prompts(n: int) -> list[object]:
    from models.llm.tasks import KINDS, heldout_prompts

    per_kind = max(1, math.ceil(n / len(KINDS)))
    qas = heldout_prompts(per_kind=per_kind)
    # Interleave the kinds so a cut keeps them balanced.
    by_kind = [qas[i * per_kind:(i + 1) * per_kind] for i in range(len(KINDS))]
    return [q for group in zip(*by_kind) for q in group][:n]


def accuracy(llm: object, k: int, prompts: Sequence[object], transfer: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Greedy held-out answer accuracy with hidden states passed through ``transfer`` at every call."""
    right = answers_right(llm, k, prompts, transfer)
    return sum(right) / len(right)


def answers_right(llm: object, k: int, prompts: Sequence[object], transfer: Callable[[torch.Tensor], torch.Tensor]
                  ) -> list[bool]:
    """Per prompt: is the greedy answer right, with hidden states through ``transfer`` (for paired statistics)."""
    from models.llm.tasks import is_correct, split_generate_fn

    gen = split_generate_fn(llm.model, llm.tokenizer, k, transfer, MAX_NEW_TOKENS)  # type: ignore[attr-defined]
    return [is_correct(gen(q.prompt), q.answer) for q in prompts]  # type: ignore[attr-defined]


def paired_ci(base: Sequence[bool], test: Sequence[bool]) -> tuple[float, float, float]:
    """Accuracy difference test − base in points over the same prompts, with a paired bootstrap 95 % interval."""
    diff, lo, hi = paired_difference(base, test)
    return diff * 100, lo * 100, hi * 100


@torch.no_grad()
def teacher_forced(llm: object, k: int, texts: Sequence[str], transfer: Callable[[torch.Tensor], torch.Tensor],
                   clean: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(next-token agreement with the uncoded model over every position, MSE of the delivered hidden states)."""
    _, device = _split(llm, k)
    agree = total = 0
    se, n = 0.0, 0
    for h, ref in zip(clean, reference):
        got = transfer(h)
        se += float((got - h).double().pow(2).sum())
        n += h.numel()
        device.reset()
        pred = device.prefill(got, 0, all_rows=True).argmax(-1)
        agree += int((pred == ref).sum())
        total += ref.numel()
    return agree / total, se / n


@torch.no_grad()
def _clean_states(llm: object, k: int, texts: Sequence[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    edge, device = _split(llm, k)
    clean, ref = [], []
    for text in texts:
        edge.reset()
        h = edge.prefill(llm.tokenizer(text, return_tensors="pt").input_ids)  # type: ignore[attr-defined]
        device.reset()
        clean.append(h)
        ref.append(device.prefill(h, 0, all_rows=True).argmax(-1))
    return clean, ref


def run_rate(model_dir: str | Path = DEFAULT_LLM_DIR, split_layers: Sequence[int] = (1, 2),
             codecs: Sequence[str] = RATE_CODECS, n_prompts: int = 200) -> list[dict[str, object]]:
    """One row per (split layer, codec) plus an ``uncoded`` row per split layer (see the module docstring)."""
    from models.llm.loader import load_llm

    llm = load_llm(model_dir)
    prompts = _prompts(n_prompts)
    texts = [q.text for q in prompts]  # type: ignore[attr-defined]
    rows: list[dict[str, object]] = []
    for k in split_layers:
        clean, ref = _clean_states(llm, k, texts)
        peak = max(float(h.abs().max()) for h in clean)
        base_right = answers_right(llm, k, prompts, lambda h: h)
        base_acc = sum(base_right) / len(base_right)
        rows.append({"split_layer": k, "codec": "uncoded", "kind": "-", "accuracy": base_acc, "agreement": 1.0,
                     "psnr_db": math.inf, "peak_abs": peak, "bits_per_value": 32.0, "symbols_per_value": 0.0,
                     "prompts": len(prompts)})
        for spec in codecs:
            start = time.time()
            tf = CodecLink(spec, codec_set_dir(model_dir, k))
            agreement, mse = teacher_forced(llm, k, texts, tf, clean, ref)
            gen = CodecLink(spec, codec_set_dir(model_dir, k))
            right = answers_right(llm, k, prompts, gen)
            acc = sum(right) / len(right)
            diff, lo, hi = paired_ci(base_right, right)
            t = gen.traffic
            rows.append({
                "split_layer": k, "codec": spec, "kind": codec_kind(gen.name), "accuracy": acc,
                "agreement": agreement, "psnr_db": 10 * math.log10(peak ** 2 / mse) if mse > 0 else math.inf,
                "peak_abs": peak, "bits_per_value": t.bits / t.values, "symbols_per_value": t.symbols / t.values,
                "prompts": len(prompts), "acc_diff_points": diff, "acc_diff_ci_low": lo, "acc_diff_ci_high": hi,
            })
            logger.info("k=%d %-26s acc %.3f agree %.4f psnr %.1f dB %.3f bits/value (%.1f s)", k, spec, acc,
                        agreement, rows[-1]["psnr_db"], rows[-1]["bits_per_value"], time.time() - start)
    return rows


def cell_generator(*key: int) -> torch.Generator:
    """The channel's random stream of one cell: reproducible, independent per cell."""
    return torch.Generator("cpu").manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def run_snr(model_dir: str | Path = DEFAULT_LLM_DIR, split_layer: int = 2, codecs: Sequence[str] = SNR_CODECS,
            snrs_db: Sequence[float] = SNRS_DB, channels: Sequence[str] = SNR_CHANNELS, n_prompts: int = 32,
            seed: int = 0) -> list[dict[str, object]]:
    """Greedy accuracy per (channel, SNR, codec) over :class:`radio.link.Link` (see the module docstring)."""
    from models.llm.loader import load_llm
    from radio import ChannelSpec
    from radio.link import Link

    llm = load_llm(model_dir)
    prompts = _prompts(n_prompts)
    link = Link()
    rows: list[dict[str, object]] = []
    for ci, channel in enumerate(channels):
        for si, snr in enumerate(snrs_db):
            for ki, spec in enumerate(codecs):
                start = time.time()
                name, _ = parse_codec_spec(spec)
                digital = DIGITAL_LINK if codec_kind(name) == "digital" else {}
                chan = ChannelSpec.create(channel, snr_db=snr, **digital)
                tx = CodecLink(spec, codec_set_dir(model_dir, split_layer), chan, link,
                               cell_generator(seed, ci, si, ki))
                acc = accuracy(llm, split_layer, prompts, tx)
                t = tx.traffic
                rows.append({
                    "split_layer": split_layer, "channel": channel, "snr_db": snr, "codec": spec,
                    "kind": codec_kind(name), "transport": "ldpc-qpsk-1/2" if digital else "analog-mmse",
                    "accuracy": acc, "bits_per_value": t.bits / t.values, "symbols_per_value": t.symbols / t.values,
                    "damaged_share": t.damaged / max(t.payloads, 1),
                    "concealed_share": t.concealed / max(t.payloads, 1), "prompts": len(prompts),
                })
                logger.info("%s %5.1f dB %-18s acc %.3f damaged %.2f concealed %.2f (%.1f s)", channel, snr, spec,
                            acc, rows[-1]["damaged_share"], rows[-1]["concealed_share"], time.time() - start)
    return rows


def planted_hidden(model_dir: str | Path, split_layer: int, factor: float = 1000.0, dims: Sequence[int] = (5, 77)
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A real prefill's hidden states with planted massive activations: ``dims`` ×``factor`` in every row, and a
    first token ×``factor`` (a planted value is ``factor`` × max(|h|, median |h|), so none is accidentally
    small); returns (hidden (1, T, d), mask of the planted values)."""
    from models.llm.loader import load_llm

    llm = load_llm(model_dir)
    edge, _ = _split(llm, split_layer)
    qa = _prompts(1)[0]
    h = edge.prefill(llm.tokenizer(qa.text, return_tensors="pt").input_ids)  # type: ignore[attr-defined]
    mask = torch.zeros_like(h, dtype=torch.bool)
    mask[..., list(dims)] = True
    mask[:, 0] = True
    big = torch.sign(h) * factor * h.abs().clamp_min(float(h.abs().median()))
    return torch.where(mask, big, h), mask


def run_outliers(model_dir: str | Path = DEFAULT_LLM_DIR, split_layer: int = 2,
                 codecs: Sequence[str] = OUTLIER_CODECS) -> list[dict[str, object]]:
    """Each clipping codec with and without the outlier side channel on planted massive activations: worst
    relative error of the planted values, relative RMS error of the rest, bits per value."""
    h, mask = planted_hidden(model_dir, split_layer)
    rows = []
    for spec in codecs:
        name, params = parse_codec_spec(spec)
        for variant in (name, f"{name}+ol"):
            c = codec.build_codec(variant, params, codec_set_dir(model_dir, split_layer))
            p = c.encode({"hidden": h})
            y = c.decode(p)["hidden"]
            rel = ((y - h).abs() / h.abs().clamp_min(1e-3))[mask]
            bulk = (y - h)[~mask].pow(2).mean().sqrt() / h[~mask].pow(2).mean().sqrt()
            rows.append({"split_layer": split_layer, "codec": variant, "planted_max_rel_error": float(rel.max()),
                         "planted_median_rel_error": float(rel.median()), "bulk_rel_rms_error": float(bulk),
                         "bits_per_value": p.bits_sent / h.numel(), "side_bits": 8 * len(p.side_info),
                         "planted_values": int(mask.sum()), "values": h.numel()})
    return rows


def write_csv(path: Path, rows: Sequence[dict[str, object]]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, object]], keys: Sequence[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def snr_pivot(rows: Sequence[dict[str, object]], key: str = "accuracy", label: str = "greedy accuracy") -> str:
    """``key`` (accuracy) per codec (rows) and SNR (columns), one table per channel."""
    out = []
    for channel in dict.fromkeys(r["channel"] for r in rows):
        sub = [r for r in rows if r["channel"] == channel]
        snrs = list(dict.fromkeys(r["snr_db"] for r in sub))
        lines = [f"**{channel}** ({label})", "", "| codec | " + " | ".join(f"{s:g} dB" for s in snrs) + " |",
                 "|---|" + "---|" * len(snrs)]
        for spec in dict.fromkeys(r["codec"] for r in sub):
            acc = {r["snr_db"]: r[key] for r in sub if r["codec"] == spec}
            lines.append(f"| {spec} | " + " | ".join(f"{acc[s]:.3f}" for s in snrs) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def summary(rate: Sequence[dict[str, object]]) -> list[str]:
    """The headline numbers: int8 and fp16 agreement, and the cheapest digital codec within 2 points."""
    lines = []
    for k in dict.fromkeys(r["split_layer"] for r in rate):
        sub = {r["codec"]: r for r in rate if r["split_layer"] == k}
        base = float(sub["uncoded"]["accuracy"])  # type: ignore[arg-type]
        ok = [r for r in sub.values()
              if r["kind"] == "digital" and float(r["accuracy"]) >= base - 0.02]  # type: ignore[arg-type]
        best = min(ok, key=lambda r: float(r["bits_per_value"]), default=None)  # type: ignore[arg-type]
        parts = [f"k={k}: uncoded accuracy {base:.3f}"]
        for name in ("raw-fp16", "int8-token"):
            if name in sub:
                agreement = float(sub[name]["agreement"])  # type: ignore[arg-type]
                parts.append(f"{name} next-token agreement {agreement:.4f}")
        if best is not None:
            bits, acc = float(best["bits_per_value"]), float(best["accuracy"])  # type: ignore[arg-type]
            parts.append(f"cheapest digital codec within 2 points: {best['codec']} at {bits:.3f} bits/value "
                         f"(accuracy {acc:.3f})")
        within1 = [r for r in sub.values() if r["kind"] == "digital" and "acc_diff_points" in r
                   and float(r["acc_diff_points"]) >= -1.0]  # type: ignore[arg-type]
        best1 = min(within1, key=lambda r: float(r["bits_per_value"]), default=None)  # type: ignore[arg-type]
        if best1 is not None:
            parts.append(f"lowest rate within 1 point: {best1['codec']} at {float(best1['bits_per_value']):.3f} "
                         f"bits/value, {float(best1['acc_diff_points']):+.1f} points (paired 95 % interval "
                         f"[{float(best1['acc_diff_ci_low']):+.1f}, {float(best1['acc_diff_ci_high']):+.1f}])")
        lines.append("; ".join(parts))
    return lines


def report_sections(rate: Sequence[dict[str, object]], snr: Sequence[dict[str, object]],
                    outliers: Sequence[dict[str, object]]) -> list[str]:
    """The markdown of the rate, SNR and planted-outlier parts (``llm_rate.md`` and ``meg bench llm``'s md)."""
    md = ["## Summary", "", *[f"* {line}" for line in summary(rate)], "",
          "## Rate and fidelity (ideal link)", "",
          "accuracy: greedy held-out answers; agreement: teacher-forced next-token agreement with the uncoded split "
          "over every position of prompt + answer; PSNR: peak = max |h| over the clean hidden states of the "
          "evaluation texts at that k (`peak_abs`); bits_per_value: bits sent (payload + counted side information) "
          "per hidden value over the generation traffic (prefill and every decode step); analog codecs are measured "
          "noise-free (jscc-hidden coded for 20 dB) and count symbols instead (their bits are the analog gain's "
          "side information). `uncoded` is the split with exact float32 transfer, identical to the monolithic "
          "`model.generate`.", "",
          markdown_table(rate, ["split_layer", "codec", "kind", "accuracy", "agreement", "psnr_db", "bits_per_value",
                                "symbols_per_value", "peak_abs", "prompts"])] if rate else []
    if snr:
        first_snr = snr[0]["snr_db"]
        md += ["", "## Accuracy versus SNR", "",
               f"Split layer {snr[0]['split_layer']}, {snr[0]['prompts']} held-out prompts per cell; "
               "digital codecs over CRC + 5G LDPC + QPSK rate 1/2 (erased code blocks arrive zero-filled; a "
               "payload that then does not decode is concealed as zeros), analog ones as MMSE-equalised symbols "
               "(perfect CSI).", "",
               snr_pivot(snr), "", snr_pivot(snr, "damaged_share", "share of payloads with a failed CRC"), "",
               markdown_table([r for r in snr if r["channel"] == snr[0]["channel"] and r["snr_db"] == first_snr],
                              ["codec", "kind", "transport", "bits_per_value", "symbols_per_value"])]
    if outliers:
        md += ["", "## Planted outliers", "",
               "A real prefill at split layer 2 with dimensions 5 and 77 ×1000 in every row and the first token "
               "×1000. "
               "Without the `outliers` side channel the clipping codecs destroy the planted values (fitted range) or "
               "the rest of their rows (absmax, rotation); with it both survive.", "",
               markdown_table(outliers, ["codec", "planted_max_rel_error", "planted_median_rel_error",
                                         "bulk_rel_rms_error", "bits_per_value", "side_bits", "planted_values"])]
    return md


def write_report(out_dir: Path, rate: Sequence[dict[str, object]], snr: Sequence[dict[str, object]],
                 outliers: Sequence[dict[str, object]], seconds: float) -> None:
    """``llm_rate.csv`` (every row, a ``part`` column says which benchmark) and ``llm_rate.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "llm_rate.csv", [{"part": "rate", **r} for r in rate] + [{"part": "snr", **r} for r in snr]
              + [{"part": "outliers", **r} for r in outliers])
    md = ["# Hidden-state codecs on the embedded LLM (`python -m bench.llm_rate`)", "",
          "Model `models/shapes_llm_v1` (4 layers, d = 128), codec sets "
          f"`models/shapes_llm_v1/codecs/llm-hidden-k<k>`; {seconds:.0f} s on CPU.", "",
          *report_sections(rate, snr, outliers)]
    (out_dir / "llm_rate.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.llm_rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_LLM_DIR)
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts of the rate table")
    parser.add_argument("--snr-prompts", type=int, default=32, help="held-out prompts per SNR cell (0: skip)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, 2 SNRs: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.time()
    n_rate, n_snr = (8, 4) if args.quick else (args.prompts, args.snr_prompts)
    rate = run_rate(args.model_dir, n_prompts=n_rate)
    snr = run_snr(args.model_dir, n_prompts=n_snr, snrs_db=(0.0, 10.0) if args.quick else SNRS_DB) if n_snr else []
    outliers = run_outliers(args.model_dir)
    write_report(args.out, rate, snr, outliers, time.time() - start)
    for line in summary(rate):
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rate benchmark: rate-quality curves of the learned source coders, with and without distribution transforms.

``meg bench rate [--quick]`` codes held-out latents of the embedded model one request (one image) at a
time with every trained coder at every quality, through the real codec pipeline (header, CRC and all), and
reports

* rate in bpfp (bits per feature point = payload bytes x 8 / (C*H*W)) and bits per image pixel;
* quality as feature MSE and feature PSNR (peak = the FCM range of the weights set, i.e. the span that
  holds 99.8 % of feature values), and, when the real VAE exists, decoded-image PSNR against the decode of
  the uncoded latents;
* BD-rate (Bjontegaard) of DT-UFC against no transform for every coder family, and of the FCM baseline,
  whatever its sign: negative means the transform saves rate at equal PSNR.

Writes ``rate.csv``, ``rate.png`` and ``rate.md`` into the output folder (``bench/results`` for a full run,
``bench/results/_tmp/quick`` with ``--quick``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: (codec preset, coder family, transform) rows of the benchmark.
CURVES: tuple[tuple[str, str, str], ...] = (
    ("factorized", "factorized", "identity"), ("hyperprior", "hyperprior", "identity"),
    ("mshyperprior", "mshyperprior", "identity"), ("elic", "elic", "identity"),
    ("gained-native", "gained-native", "identity"),
    ("gained", "gained", "identity"), ("fcm+gained", "gained", "fcm"), ("dtufc+gained", "gained", "dtufc"),
    ("dtufc-clip+gained", "gained", "dtufc-clip"), ("dtufc-pwl+gained", "gained", "dtufc-pwl"),
)
QUALITIES: tuple[int, ...] = (1, 2, 3, 4)


@dataclass
class RatePoint:
    """One codec at one quality, averaged over the held-out latents."""

    codec: str
    family: str
    transform: str
    quality: int
    bpfp: float
    bits_per_pixel: float
    bytes_per_image: float
    feature_mse: float
    feature_psnr: float
    image_psnr: float
    encode_ms: float
    decode_ms: float
    n_images: int


def bd_rate(rate_ref: list[float], psnr_ref: list[float], rate_test: list[float], psnr_test: list[float]) -> float:
    """Bjontegaard delta rate (%) of ``test`` against ``ref`` at equal PSNR.

    Classic VCEG-M33 method: fit log-rate as a cubic polynomial of PSNR for each curve, integrate both over
    the PSNR interval the curves share, and turn the mean log-rate difference into a percentage. Needs at
    least 4 points per curve; returns NaN when the PSNR ranges do not overlap (no honest number exists).
    """
    r1, p1 = np.log(np.asarray(rate_ref, float)), np.asarray(psnr_ref, float)
    r2, p2 = np.log(np.asarray(rate_test, float)), np.asarray(psnr_test, float)
    if min(len(p1), len(p2)) < 4 or not (np.isfinite(r1).all() and np.isfinite(r2).all()
                                        and np.isfinite(p1).all() and np.isfinite(p2).all()):
        return float("nan")
    lo, hi = max(p1.min(), p2.min()), min(p1.max(), p2.max())
    if hi <= lo:
        return float("nan")
    fit1, fit2 = np.polyfit(p1, r1, 3), np.polyfit(p2, r2, 3)
    int1, int2 = np.polyint(fit1), np.polyint(fit2)
    avg1 = (np.polyval(int1, hi) - np.polyval(int1, lo)) / (hi - lo)
    avg2 = (np.polyval(int2, hi) - np.polyval(int2, lo)) / (hi - lo)
    return float((np.exp(avg2 - avg1) - 1.0) * 100.0)


def _psnr(mse: float, peak: float) -> float:
    return float(10 * math.log10(peak ** 2 / mse)) if mse > 0 else float("inf")


def heldout_latents(n: int, source: str = "vae") -> tuple[torch.Tensor, torch.nn.Module | None, str]:
    """Held-out latents, the real VAE when it exists, and a source label.

    ``"vae"``: VAE means of rendered held-out images (seeds from HELDOUT_SEED_BASE; what the coders were
    trained on). ``"diffusion"``: the latents the edge really sends, for the same held-out prompts and seeds as
    ``meg bench snr`` (so both benchmarks code the same features).
    """
    from codec.train_coders import encode_images, load_vae, real_model_ready
    from models import shapes

    real = real_model_ready()
    if source == "diffusion":
        if not real:
            raise RuntimeError("diffusion latents need the embedded model (models/shapes_v1)")
        from bench.snr import held_out_latents, load_family
        from models import DEFAULT_MODEL_DIR

        family = load_family(DEFAULT_MODEL_DIR)
        return held_out_latents(family, n, "diffusion").latents, family.vae, "diffusion:shapes_v1"
    if source != "vae":
        raise ValueError(f"unknown latent source {source!r}: 'vae' or 'diffusion'")
    vae = load_vae(standin=not real)
    latents = encode_images(vae, range(shapes.HELDOUT_SEED_BASE, shapes.HELDOUT_SEED_BASE + n))
    return latents, (vae if real else None), ("vae-mean:shapes_v1" if real else "standin-random-vae")


@torch.no_grad()
def _decode_images(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    return ((vae.decode(latents).sample.clamp(-1, 1) + 1) / 2).float()


def measure_curve(preset: str, family: str, transform: str, latents: torch.Tensor, vae: torch.nn.Module | None,
                  ref_images: torch.Tensor | None, peak: float, bar: Any = None, weights: Path | None = None
                  ) -> list[RatePoint]:
    """Code every latent separately (one request each) at every quality; ``bar`` (tqdm) advances per quality.
    ``weights``: the image codec set to code with (default: the embedded model's)."""
    from codec import build_codec
    from codec.image_sets import image_set_dir
    from models import DEFAULT_MODEL_DIR

    weights = weights if weights is not None else image_set_dir(DEFAULT_MODEL_DIR)

    points = []
    for q in QUALITIES:
        c = build_codec(preset, {"learned_quality": str(q)}, weights)
        bits, decoded, t_enc, t_dec = [], [], 0.0, 0.0
        for i in range(len(latents)):
            x = {"latents": latents[i:i + 1]}
            t0 = time.perf_counter()
            payload = c.encode(x)
            t1 = time.perf_counter()
            decoded.append(c.decode(payload)["latents"])
            t_dec += time.perf_counter() - t1
            t_enc += t1 - t0
            bits.append(payload.bits_sent)
        rec = torch.cat(decoded)
        n, ch, h, w = latents.shape
        mse = float(torch.mean((rec - latents) ** 2))
        img_psnr = float("nan")
        if vae is not None and ref_images is not None:
            imgs = _decode_images(vae, rec)
            per = torch.mean((imgs - ref_images) ** 2, dim=(1, 2, 3)).clamp_min(1e-10)
            img_psnr = float(torch.mean(10 * torch.log10(1.0 / per)))
        mean_bits = float(np.mean(bits))
        # Pixels of the image the latent decodes to (64x64 for shapes_v1, whose VAE downsamples by 4); without
        # the real VAE, the Stable Diffusion factor of 8.
        pixels = ref_images.shape[-2] * ref_images.shape[-1] if ref_images is not None else h * 8 * w * 8
        points.append(RatePoint(preset, family, transform, q, mean_bits / (ch * h * w), mean_bits / pixels,
                                mean_bits / 8, mse, _psnr(mse, peak), img_psnr, 1e3 * t_enc / n, 1e3 * t_dec / n, n))
        p = points[-1]
        log.debug("%-20s q%d: %.3f bpfp, feature PSNR %.2f dB, image PSNR %.2f dB", preset, q, p.bpfp,
                  p.feature_psnr, p.image_psnr)
        if bar is not None:
            bar.set_postfix_str(f"{preset} q{q}: {p.bpfp:.2f} bpfp, {p.image_psnr:.1f} dB")
            bar.update()
    return points


def _bd_table(points: list[RatePoint]) -> list[dict[str, Any]]:
    """BD-rates of the transforms behind the variable-rate coder, and of coder against coder (no transform)."""
    by: dict[tuple[str, str], list[RatePoint]] = {}
    for p in points:
        by.setdefault((p.family, p.transform), []).append(p)
    # (test family, test transform, reference family, reference transform)
    comparisons = [("gained", t, "gained", "identity") for t in ("fcm", "dtufc", "dtufc-clip", "dtufc-pwl")]
    comparisons += [("gained", t, "gained", "fcm") for t in ("dtufc", "dtufc-clip", "dtufc-pwl")]
    comparisons += [("gained", "identity", "mshyperprior", "identity"),  # capacity: N=64/M=96 vs 32/16
                    ("gained-native", "identity", "gained", "identity")]  # the latent's channels vs one plane
    rows = []
    for fam, test, ref_fam, ref in comparisons:
        if (fam, test) not in by or (ref_fam, ref) not in by:
            continue
        a, b = by[(ref_fam, ref)], by[(fam, test)]
        rows.append({"family": fam, "test": test, "reference": ref if ref_fam == fam else f"{ref_fam} {ref}",
                     "bd_rate_feature_psnr_pct": bd_rate([p.bpfp for p in a], [p.feature_psnr for p in a],
                                                         [p.bpfp for p in b], [p.feature_psnr for p in b]),
                     "bd_rate_image_psnr_pct": bd_rate([p.bpfp for p in a], [p.image_psnr for p in a],
                                                       [p.bpfp for p in b], [p.image_psnr for p in b])})
    return rows


def _plot(points: list[RatePoint], path: Path, with_images: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if with_images else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.8), squeeze=False)
    styles = {"identity": "-", "dtufc": "--", "fcm": ":", "dtufc-clip": "-.", "dtufc-pwl": (0, (5, 1, 1, 1, 1, 1))}
    colors = {"factorized": "C0", "hyperprior": "C1", "mshyperprior": "C2", "elic": "C3", "gained-native": "k"}
    transform_colors = {"identity": "C4", "fcm": "C5", "dtufc": "C6", "dtufc-clip": "C7", "dtufc-pwl": "C8"}
    curves = {}
    for p in points:
        curves.setdefault(p.codec, []).append(p)
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: p.bpfp)
        # The compact families are told apart by colour; the variable-rate coder's transforms by colour and line.
        color = colors.get(pts[0].family) or transform_colors.get(pts[0].transform, "k")
        kw = dict(ls=styles.get(pts[0].transform, "-"), color=color, marker="o", ms=3, label=name)
        axes[0][0].plot([p.bpfp for p in pts], [p.feature_psnr for p in pts], **kw)
        if with_images:
            axes[0][1].plot([p.bpfp for p in pts], [p.image_psnr for p in pts], **kw)
    axes[0][0].set(xlabel="rate (bpfp)", ylabel="feature PSNR (dB, peak = FCM range)", title="Latent fidelity")
    if with_images:
        axes[0][1].set(xlabel="rate (bpfp)", ylabel="decoded-image PSNR vs uncoded decode (dB)", title="Image fidelity")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _markdown(points: list[RatePoint], bd: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Rate benchmark: learned feature coders with and without distribution transforms", "",
             f"Held-out latents: {meta['n_images']} ({meta['source']}), coded one request each through the real "
             f"codec pipeline; weights set `{meta['weights_set']}` trained on {meta['train_source']}. "
             f"Mode: {meta['mode']}; {meta['seconds']:.0f} s. Reproduce: `{meta['command']}`.",
             "",
             "Rate in bpfp = payload bytes x 8 / (C*H*W) (header params not counted; version byte and CRC are); "
             "bits/pixel of the decoded image (64x64 for shapes_v1). Feature PSNR peak = FCM range "
             f"({meta['peak']:.3f}). Image PSNR: VAE decode of coded vs uncoded latents.", "",
             "| codec | q | bpfp | bits/pixel | bytes/image | feature MSE | feature PSNR (dB) | image PSNR (dB) | enc ms | dec ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p.codec} | {p.quality} | {p.bpfp:.3f} | {p.bits_per_pixel:.4f} | {p.bytes_per_image:.1f} | "
                     f"{p.feature_mse:.4g} | {p.feature_psnr:.2f} | {p.image_psnr:.2f} | {p.encode_ms:.1f} | "
                     f"{p.decode_ms:.1f} |")
    lines += ["", "## BD-rate (cubic fit of log-rate vs PSNR over the shared PSNR range; negative = saves rate)", "",
              "| family | test | reference | BD-rate, feature PSNR | BD-rate, image PSNR |", "|---|---|---|---|---|"]
    for r in bd:
        lines.append(f"| {r['family']} | {r['test']} | {r['reference']} | {r['bd_rate_feature_psnr_pct']:+.1f} % | "
                     f"{r['bd_rate_image_psnr_pct']:+.1f} % |")
    lines += ["", "NaN: the two curves share no PSNR range, so no BD-rate can be computed honestly.", ""]
    return "\n".join(lines)


SMOKE_IMAGES = 2


def run(quick: bool, out_dir: Path = RESULTS_DIR, *, n_images: int | None = None, source: str = "diffusion",
        curves: list[str] | None = None, progress: bool = True, command: str = "meg bench rate",
        mode: str | None = None) -> dict[str, Any]:
    """Run the benchmark, write rate.csv/png/md into ``out_dir``, return the points and BD-rates.

    Quick: 8 held-out latents; full: 48. ``curves`` keeps the presets named (default: all of :data:`CURVES`).
    """
    import codec  # noqa: F401
    from codec.image_sets import image_set_dir
    from models import DEFAULT_MODEL_DIR
    from tqdm.auto import tqdm

    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    n = n_images or (8 if quick else 48)
    chosen = [c for c in CURVES if curves is None or c[0] in curves]
    if not chosen:
        raise ValueError(f"no curve among {curves}; known: {', '.join(c[0] for c in CURVES)}")
    latents, vae, source_label = heldout_latents(n, source)
    weights = image_set_dir(DEFAULT_MODEL_DIR)  # the embedded model's codec set: its latents are measured
    meta_path = weights / "learned_shapes_v1.json"
    train_meta = json.loads(meta_path.read_text())
    lo, hi = train_meta["fcm_range"]
    peak = float(hi - lo)
    ref_images = _decode_images(vae, latents) if vae is not None else None
    points: list[RatePoint] = []
    with tqdm(total=len(chosen) * len(QUALITIES), desc="bench rate", disable=not progress) as bar:
        for preset, family, transform in chosen:
            points += measure_curve(preset, family, transform, latents, vae, ref_images, peak, bar, weights)
    bd = _bd_table(points)
    for r in bd:
        log.info("BD-rate %s %s vs %s: %+.1f %% (feature PSNR), %+.1f %% (image PSNR)", r["family"], r["test"],
                 r["reference"], r["bd_rate_feature_psnr_pct"], r["bd_rate_image_psnr_pct"])
    meta = {"n_images": n, "source": source_label, "weights_set": "shapes_v1",
            "train_source": train_meta.get("source"), "quick": quick, "seconds": time.time() - t0, "peak": peak,
            "command": command, "mode": mode or ("quick" if quick else "full")}
    with open(out_dir / "rate.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(points[0])))
        writer.writeheader()
        for p in points:
            writer.writerow(asdict(p))
    _plot(points, out_dir / "rate.png", with_images=vae is not None)
    (out_dir / "rate.md").write_text(_markdown(points, bd, meta))
    log.info("wrote %s/rate.{csv,png,md} in %.0fs", out_dir, time.time() - t0)
    return {"points": [asdict(p) for p in points], "bd_rate": bd, "meta": meta}


def main(argv: list[str] | None = None) -> int:
    """``meg bench rate [--quick | --smoke] [--out DIR]`` (arguments: :func:`bench.cli.build_parser`)."""
    from bench.cli import parse

    args = parse("rate", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    n_images, source = args.n_images, args.source
    if args.smoke:
        n_images, source = n_images or SMOKE_IMAGES, source or "vae"
    run(args.quick or args.smoke, args.out, n_images=n_images, source=source or "diffusion", curves=args.curves,
        progress=not args.no_progress, mode="smoke" if args.smoke else None,
        command=" ".join(["meg bench rate", *(argv if argv is not None else sys.argv[1:])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``meg bench universal``: is one learned coder universal across feature sources, and does DT-UFC make it so?

DT-UFC claims one coder for the features of many models, made possible by its peaky-to-balanced transform.
This benchmark tests that claim where it is made, on this project's three feature sources:

* ``image``: the embedded diffusion model's final latents (sampler output, 4x16x16, tiled to one 32x32 plane);
* ``llm-k1`` / ``llm-k2``: the embedded LLM's hidden states after layer 1 / 2 (tokens x 128 as one plane,
  the FCM-LM / DT-UFC packing of ``seq x d`` features as a grey image).

Every coder is the variable-rate mean-scale hyperprior of :mod:`codec.variable_rate` (N=64, M=96, four
qualities), trained by :func:`codec.train_gained.train_gained` for the same number of steps:

* per source, behind FCM (clip + min-max) and behind DT-UFC (upstream-faithful, index-domain loss);
* on the mix of all three sources (round-robin batches), behind each source's own FCM, DT-UFC, or DT-UFC as
  a piecewise-linear map (feature-domain loss), since DT-UFC fits one set of centres per model.

Each coder is evaluated on every source (cross-source transfer included) through the real entropy coder
(``compress`` bytes, not likelihood estimates): bits per feature point, feature PSNR (peak: max |x| of the
source's held-out features, stated), and the task: image PSNR of the VAE decode against the uncoded decode and
classifier accuracy for images; greedy answer accuracy on held-out prompts and teacher-forced next-token
agreement with the uncoded model for the LLM. Coders are also evaluated at half their steps (a snapshot of the
same run, annealed the same way) to show whether training had stopped moving the curve.

Outputs: ``universal.{csv,json,md,png}``. Coders are cached under ``~/.cache/meg/universal`` (rerunning
evaluates without retraining; ``--retrain`` redoes them).
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.llm_rate import answers_right, paired_ci
from bench.rate import bd_rate
from codec.learned import decode_planes, encode_planes
from codec.packing import tile_planes, untile_planes
from codec.train_gained import GainedJob, SourceTransforms, TrainSource, train_many

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path.home() / ".cache" / "meg" / "universal"
SOURCES: tuple[str, ...] = ("image", "llm-k1", "llm-k2")
PLANE_ROWS = 32  # LLM training planes: 32 consecutive token rows x d
DEFAULT_STEPS = 4000


@dataclass
class Source:
    """One feature source: training planes (raw features), held-out features and its fitted transforms."""

    name: str
    train_planes: torch.Tensor  # (n, 1, H, W) raw features
    transforms: SourceTransforms
    peak: float  # feature PSNR peak: max |x| over the held-out features

    def train_source(self, domain: str) -> TrainSource:
        return self.transforms.train_source(self.name, self.train_planes, domain)


@dataclass(frozen=True)
class CoderSpec:
    """A coder of the experiment: what it was trained on, behind which transform."""

    trained_on: str  # a source name or "mixed"
    domain: str

    @property
    def name(self) -> str:
        return f"{self.domain}@{self.trained_on}"


def coder_specs() -> list[CoderSpec]:
    per_source = [CoderSpec(s, d) for s in SOURCES for d in ("fcm", "dtufc")]
    return per_source + [CoderSpec("mixed", d) for d in ("fcm", "dtufc", "dtufc-pwl")]


# ------------------------------------------------------------------------------------------- sources


def image_source(n_train: int, n_test: int) -> tuple[Source, Any, Any]:
    """(source, family, held-out) for the embedded image model: training latents from the codec-set sampler
    cache (sampled when missing), held-out latents for the benchmark prompts."""
    from bench.snr import held_out_latents, load_family
    from codec.fit_image import FIT_SEED, LATENTS_FILE, collect_latents, load_prompts
    from models import DEFAULT_MODEL_DIR

    cache = Path.home() / ".cache" / "meg" / "codecs" / f"{DEFAULT_MODEL_DIR.name}-image-k0" / LATENTS_FILE
    train = collect_latents(DEFAULT_MODEL_DIR, n_train, cache, load_prompts(None), 20, 4.0, FIT_SEED, 32, "cpu")
    family = load_family(DEFAULT_MODEL_DIR)
    held = held_out_latents(family, n_test, "diffusion")
    tr = SourceTransforms.fit(train)
    return Source("image", tile_planes(train[:n_train]), tr, float(held.latents.abs().max())), family, held


def llm_hidden_rows(llm: Any, k: int, n_docs: int, seed: int) -> torch.Tensor:
    from models.llm.corpus import training_document
    from models.llm.split import EdgeHalf

    edge, rng, rows = EdgeHalf(llm.model, k), random.Random(seed), []
    with torch.no_grad():
        for _ in range(n_docs):
            edge.reset()
            rows.append(edge.prefill(llm.tokenizer(training_document(rng).text, return_tensors="pt").input_ids)[0])
    return torch.cat(rows).float()


@dataclass
class LlmEval:
    """Held-out LLM material of one split layer: prompts, clean states of prompt+answer texts, references."""

    k: int
    prompts: list[Any]
    clean: list[torch.Tensor]
    reference: list[torch.Tensor]


def llm_source(llm: Any, k: int, n_docs: int, n_prompts: int) -> tuple[Source, LlmEval]:
    from bench.llm_rate import _clean_states, _prompts

    rows = llm_hidden_rows(llm, k, n_docs, seed=7)
    usable = rows[: len(rows) // PLANE_ROWS * PLANE_ROWS]
    planes = usable.reshape(-1, 1, PLANE_ROWS, rows.shape[-1])
    prompts = _prompts(n_prompts)
    clean, ref = _clean_states(llm, k, [q.prompt + q.completion for q in prompts])
    peak = max(float(h.abs().max()) for h in clean)
    return Source(f"llm-k{k}", planes, SourceTransforms.fit(rows), peak), LlmEval(k, prompts, clean, ref)


# -------------------------------------------------------------------------------------------- coders


def train_coders(specs: Sequence[CoderSpec], sources: dict[str, Source], steps: int, workers: int,
                 retrain: bool, cache_dir: Path) -> dict[str, dict[str, Any]]:
    """Trained coders (full and half-budget snapshots), from the cache when there (keyed by name and steps)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Any]] = {}
    todo: list[CoderSpec] = []
    for spec in specs:
        path = cache_dir / f"{spec.name}-{steps}.pt"
        if path.is_file() and not retrain:
            out[spec.name] = torch.load(path, weights_only=False)
        else:
            todo.append(spec)
    if todo:
        logger.info("training %d coders x %d steps (%d processes): %s", len(todo), steps, workers,
                    ", ".join(s.name for s in todo))
        jobs = []
        for i, spec in enumerate(todo):
            names = list(SOURCES) if spec.trained_on == "mixed" else [spec.trained_on]
            jobs.append((GainedJob(steps=steps, seed=i), [sources[n].train_source(spec.domain) for n in names]))
        def save(i: int, res: Any) -> None:  # as each finishes: an interrupted run keeps what it trained
            entry = {"full": res.model, "half": res.half, "log": res.log, "seconds": res.seconds, "steps": steps}
            torch.save(entry, cache_dir / f"{todo[i].name}-{steps}.pt")
            out[todo[i].name] = entry

        train_many(jobs, workers, on_result=save)
    return out


# ---------------------------------------------------------------------------------------- evaluation


def _psnr(mse: float, peak: float) -> float:
    return 10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf")


class PlaneLink:
    """Hidden states (…, T, d) through one coder quality: transform, real entropy coding, inverse."""

    def __init__(self, model: Any, tr: SourceTransforms, domain: str) -> None:
        self.model, self.tr, self.domain = model, tr, domain
        self.bits = 0
        self.values = 0

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = h.reshape(1, 1, -1, h.shape[-1]).float()
        u = self.tr.forward(x, self.domain)
        strings = encode_planes(self.model, "gained", u)
        self.bits += 8 * sum(len(s) for group in strings for s in group)
        self.values += x.numel()
        u_hat = decode_planes(self.model, "gained", strings, tuple(u.shape))
        return self.tr.inverse(u_hat, self.domain).reshape(h.shape).to(h.dtype)


@torch.no_grad()
def eval_image(model: Any, tr: SourceTransforms, domain: str, src: Source, family: Any, held: Any
               ) -> dict[str, float]:
    from bench.snr import score
    from models.decoders import decode_latents

    x = held.latents
    planes = tile_planes(x)
    u = tr.forward(planes, domain)
    strings = encode_planes(model, "gained", u)
    bits = 8 * sum(len(s) for group in strings for s in group)
    x_hat = untile_planes(tr.inverse(decode_planes(model, "gained", strings, tuple(u.shape)), domain), x.shape[1])
    mse = float(((x_hat - x) ** 2).mean())
    s = score(family, held, decode_latents(family.vae, x_hat))
    return {"bpfp": bits / x.numel(), "feature_psnr_db": _psnr(mse, src.peak), "image_psnr_db": s["psnr_db"],
            "accuracy": s["accuracy"]}


@torch.no_grad()
def eval_llm(model: Any, tr: SourceTransforms, domain: str, src: Source, llm: Any, ev: LlmEval, task: bool = True
             ) -> dict[str, Any]:
    """Rate and feature PSNR on the clean prompt+answer states; with ``task``, next-token agreement over them
    and greedy answer accuracy on the prompts (generation codes the prefill and every decode step)."""
    from bench.llm_rate import teacher_forced

    link = PlaneLink(model, tr, domain)
    if not task:
        se = sum(float((link(h) - h).double().pow(2).sum()) for h in ev.clean)
        mse = se / sum(h.numel() for h in ev.clean)
        return {"bpfp": link.bits / link.values, "feature_psnr_db": _psnr(mse, src.peak),
                "agreement": float("nan"), "accuracy": float("nan")}
    agree, mse = teacher_forced(llm, ev.k, [], link, ev.clean, ev.reference)
    feature_bits, feature_values = link.bits, link.values
    gen_link = PlaneLink(model, tr, domain)
    right = answers_right(llm, ev.k, ev.prompts, gen_link)
    return {"bpfp": feature_bits / feature_values, "feature_psnr_db": _psnr(mse, src.peak), "agreement": agree,
            "accuracy": sum(right) / len(right), "gen_bpfp": gen_link.bits / max(1, gen_link.values), "_right": right}


def transform_round_trip(src: Source, domains: Sequence[str], held: torch.Tensor) -> dict[str, float]:
    """Feature PSNR of the transform alone (forward then the decoder's inverse, no coder)."""
    out = {}
    for d in domains:
        back = src.transforms.inverse(src.transforms.forward(held, d), d)
        out[d] = _psnr(float(((back - held) ** 2).mean()), src.peak)
    return out


# -------------------------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _curve(rows: list[dict[str, Any]], coder: str, evaluated_on: str, budget: str, key: str) -> tuple[list[float], list[float]]:
    pts = sorted((r["bpfp"], r[key]) for r in rows
                 if r["coder"] == coder and r["evaluated_on"] == evaluated_on and r["budget"] == budget)
    return [p[0] for p in pts], [p[1] for p in pts]


def bd(rows: list[dict[str, Any]], test: str, ref: str, on: str, key: str = "feature_psnr_db",
       budget_test: str = "full", budget_ref: str = "full") -> float:
    rt, pt = _curve(rows, test, on, budget_test, key)
    rr, pr = _curve(rows, ref, on, budget_ref, key)
    return bd_rate(rr, pr, rt, pt)


def within_one_point(rows: list[dict[str, Any]], uncoded: dict[str, list[bool]]) -> list[dict[str, Any]]:
    """Per LLM source and coder: the lowest-rate quality whose accuracy is within 1 point of uncoded, with the
    paired 95 % interval of the difference."""
    out = []
    for on in ("llm-k1", "llm-k2"):
        base = uncoded[on]
        for coder in sorted({r["coder"] for r in rows if r["evaluated_on"] == on and r["trained_on"] in (on, "mixed")}):
            pts = sorted((r for r in rows if r["coder"] == coder and r["evaluated_on"] == on and r["budget"] == "full"),
                         key=lambda r: r["bpfp"])
            hit = next((r for r in pts if r["accuracy"] * 100 >= sum(base) / len(base) * 100 - 1.0), None)
            if hit is None:
                out.append({"evaluated_on": on, "coder": coder, "bpfp": float("nan"), "quality": "none",
                            "accuracy": float("nan"), "diff_points": float("nan"), "ci_low": float("nan"),
                            "ci_high": float("nan")})
                continue
            diff, lo, hi = paired_ci(base, hit["_right"])
            out.append({"evaluated_on": on, "coder": coder, "bpfp": hit["bpfp"], "quality": hit["quality"],
                        "accuracy": hit["accuracy"], "diff_points": diff, "ci_low": lo, "ci_high": hi})
    return out


def write_report(out_dir: Path, rows: list[dict[str, Any]], round_trip: dict[str, dict[str, float]],
                 uncoded: dict[str, Any], meta: dict[str, Any]) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    keys = ["coder", "trained_on", "domain", "evaluated_on", "budget", "quality", "bpfp", "feature_psnr_db",
            "image_psnr_db", "accuracy", "agreement"]
    with (out_dir / "universal.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k in keys})
    # Per-prompt answers stay in the JSON (compactly) so the report can be rebuilt without re-evaluating.
    plain_rows = [{k: ("".join("1" if b else "0" for b in v) if k == "_right" else v) for k, v in r.items()}
                  for r in rows]
    uncoded_plain = {k: "".join("1" if b else "0" for b in v) for k, v in uncoded.items()}
    (out_dir / "universal.json").write_text(json.dumps({"meta": meta, "rows": plain_rows, "round_trip": round_trip,
                                                        "uncoded": uncoded_plain}, indent=1) + "\n")
    (out_dir / "universal.md").write_text(markdown(rows, round_trip, uncoded, meta))
    plot(rows, out_dir / "universal.png")


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def findings(rows: list[dict[str, Any]], round_trip: dict[str, dict[str, float]]) -> list[str]:
    """Where DT-UFC helps and where it does not, as sentences with the BD-rates (feature PSNR) behind them."""
    out = []
    coders = {r["coder"] for r in rows}
    for on in SOURCES:
        if {f"fcm@{on}", f"dtufc@{on}"} <= coders:
            v = bd(rows, f"dtufc@{on}", f"fcm@{on}", on)
            out.append(f"- {on}, coder trained on it: DT-UFC {'saves' if v < 0 else 'costs'} {abs(v):.0f} % rate "
                       f"against FCM at equal feature PSNR (BD-rate {v:+.0f} %).")
    for d in ("fcm", "dtufc"):
        vals = {on: bd(rows, f"{d}@mixed", f"{d}@{on}", on) for on in SOURCES
                if {f"{d}@mixed", f"{d}@{on}"} <= coders}
        if vals:
            out.append(f"- One coder for all sources behind {d}: BD-rate against the per-source {d} coder "
                       + ", ".join(f"{on} {v:+.0f} %" for on, v in vals.items()) + ".")
    for d in ("fcm", "dtufc"):
        pairs = [bd(rows, f"{d}@{a}", f"{d}@{b}", b) for a in SOURCES for b in SOURCES
                 if a != b and {f"{d}@{a}", f"{d}@{b}"} <= coders]
        if pairs:
            out.append(f"- Cross-source transfer behind {d}: mean BD-rate of a coder used on a source it was not "
                       f"trained on, against that source's own coder, {_mean(pairs):+.0f} % "
                       f"({sum(1 for p in pairs if math.isfinite(p))} pairs).")
    if {"dtufc-pwl@mixed", "dtufc@mixed"} <= coders:
        vals = {on: bd(rows, "dtufc-pwl@mixed", "dtufc@mixed", on) for on in SOURCES}
        out.append("- DT-UFC as an invertible piecewise-linear map with the loss in feature units, against the "
                   "upstream form, both trained on the mix: " + ", ".join(f"{on} {v:+.0f} %" for on, v in vals.items())
                   + ".")
    moves = [bd(rows, c, c, on, budget_ref="half") for c in coders
             for on in (SOURCES if c.endswith("@mixed") else (c.split("@")[1],))]
    moves = [m for m in moves if math.isfinite(m)]
    if moves:
        out.append(f"- Training budget: from half the steps to all of them the curves still move by {max(moves):+.0f} "
                   f"to {min(moves):+.0f} % (BD-rate, feature PSNR), so the coders are not converged; the "
                   "differences between transforms above are larger than that, the ones between mixed and "
                   "per-source coders of the same order.")
    if round_trip:
        trip = {src: vals.get("dtufc", float("nan")) for src, vals in round_trip.items()}
        out.append("- The upstream transform alone caps feature PSNR at " + ", ".join(
            f"{src} {v:.1f} dB" for src, v in trip.items()) + " (256 levels); the piecewise-linear form has no cap.")
    return out


def markdown(rows: list[dict[str, Any]], round_trip: dict[str, dict[str, float]], uncoded: dict[str, Any],
             meta: dict[str, Any]) -> str:
    L: list[str] = ["# Universal feature coding: one coder across feature sources, with and without DT-UFC", ""]
    L += [f"Reproduce: `{meta['command']}` ({meta['minutes']:.0f} min on this machine; coders cached). "
          f"Coder: variable-rate mean-scale hyperprior (N=64, M=96, 4 qualities), {meta['steps']} steps of batch 8 "
          "(32x32 patches) each, the same for per-source and mixed coders (a mixed coder sees each source a third "
          "as often). Rates are real entropy-coded bytes × 8 / feature values (bpfp). Feature PSNR peak = max |x| "
          "of the source's held-out features: " + ", ".join(f"{k} {v:.2f}" for k, v in meta["peaks"].items()) + ".",
          "", "Held-out sets: " + "; ".join(meta["heldout"]) + ".", ""]
    L += ["## Findings (computed from the tables below)", "", *findings(rows, round_trip), ""]
    L += ["## The transform alone (forward, then the decoder's inverse; no coder)", "",
          "| source | " + " | ".join(next(iter(round_trip.values()))) + " |",
          "|---|" + "---|" * len(next(iter(round_trip.values())))]
    for src, vals in round_trip.items():
        L.append(f"| {src} | " + " | ".join(f"{v:.1f} dB" for v in vals.values()) + " |")
    L += ["", "fcm clips the 0.1 % tails; dtufc / dtufc-clip map to 256 centres (the round trip is their ceiling); "
          "dtufc-pwl is invertible.", ""]
    L += ["## Per source: mixed training and DT-UFC against the per-source FCM coder", "",
          "BD-rate (negative = fewer bits for the same quality) against `fcm@<source>` on each source, "
          "in feature PSNR" + " and, for images, image PSNR" + ".", "",
          "| evaluated on | coder | BD-rate, feature PSNR | BD-rate, image PSNR |", "|---|---|---|---|"]
    coders = sorted({r["coder"] for r in rows})
    for on in SOURCES:
        ref = f"fcm@{on}"
        for c in coders:
            if c == ref:
                continue
            img = _fmt(bd(rows, c, ref, on, "image_psnr_db")) + " %" if on == "image" else ""
            L.append(f"| {on} | {c} | {_fmt(bd(rows, c, ref, on))} % | {img} |")
    L += ["", "## Cross-source transfer (trained on one source, used on another)", "",
          "BD-rate in feature PSNR of the coder trained on the row's source against the coder trained on the "
          "column's source, both behind the same transform, evaluated on the column's source (0 % = transfers "
          "for free).", ""]
    for d in ("fcm", "dtufc"):
        L += [f"**{d}**", "", "| trained on \\ used on | " + " | ".join(SOURCES) + " |", "|---|" + "---|" * len(SOURCES)]
        for a in SOURCES:
            cells = []
            for b in SOURCES:
                cells.append("—" if a == b else f"{_fmt(bd(rows, f'{d}@{a}', f'{d}@{b}', b))} %")
            L.append(f"| {a} | " + " | ".join(cells) + " |")
        L.append("")
    L += ["## Did training stop moving the curve?", "",
          "BD-rate (feature PSNR) of each coder after all its steps against the same run at half its steps, on "
          "the sources it was trained on.", "", "| coder | evaluated on | full vs half |", "|---|---|---|"]
    for c in coders:
        ons = SOURCES if c.endswith("@mixed") else (c.split("@")[1],)
        for on in ons:
            L.append(f"| {c} | {on} | {_fmt(bd(rows, c, c, on, budget_ref='half'))} % |")
    L += ["", "## LLM: lowest rate within 1 point of uncoded accuracy", "",
          "Uncoded greedy accuracy: " + ", ".join(f"{k} {sum(v) / len(v) * 100:.1f} %" for k, v in uncoded.items()
                                                  if k.startswith("llm")) +
          f" ({meta['n_prompts']} held-out prompts). Difference and paired bootstrap 95 % interval in points.", "",
          "| evaluated on | coder | quality | bpfp | accuracy | diff (points) | 95 % interval |", "|---|---|---|---|---|---|---|"]
    for r in within_one_point(rows, {k: v for k, v in uncoded.items() if k.startswith("llm")}):
        L.append(f"| {r['evaluated_on']} | {r['coder']} | {r['quality']} | {_fmt(r['bpfp'])} | {_fmt(r['accuracy'])} | "
                 f"{_fmt(r['diff_points'])} | [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] |")
    L += ["", "## Every point (full budget)", "",
          "| coder | evaluated on | q | bpfp | feature PSNR | image PSNR | accuracy | agreement |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["budget"] == "full":
            L.append(f"| {r['coder']} | {r['evaluated_on']} | {r['quality']} | {_fmt(r['bpfp'])} | "
                     f"{_fmt(r['feature_psnr_db'])} | {_fmt(r.get('image_psnr_db', float('nan')))} | "
                     f"{_fmt(r['accuracy'])} | {_fmt(r.get('agreement', float('nan')))} |")
    return "\n".join(L) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SOURCES), figsize=(5 * len(SOURCES), 4), squeeze=False)
    for ax, on in zip(axes[0], SOURCES):
        for coder in sorted({r["coder"] for r in rows}):
            x, y = _curve(rows, coder, on, "full", "feature_psnr_db")
            if x:
                own = coder.endswith("@" + on) or coder.endswith("@mixed")
                ax.plot(x, y, marker="o", ms=3, lw=1.6 if own else 0.8, ls="-" if own else ":", label=coder)
        ax.set_xscale("log")
        ax.set_xlabel("bits per feature point")
        ax.set_ylabel("feature PSNR (dB)")
        ax.set_title(f"evaluated on {on}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ run


def run(specs: Sequence[CoderSpec], steps: int, workers: int, n_prompts: int, n_images: int, n_docs: int, n_train_latents: int, out_dir: Path,
        retrain: bool, command: str, cache_dir: Path = CACHE_DIR) -> list[dict[str, Any]]:
    from models.llm import DEFAULT_LLM_DIR
    from models.llm.loader import load_llm

    t0 = time.time()
    torch.manual_seed(0)
    img, family, held = image_source(n_train_latents, n_images)
    llm = load_llm(DEFAULT_LLM_DIR)
    sources: dict[str, Source] = {"image": img}
    evals: dict[str, LlmEval] = {}
    for k in (1, 2):
        src, ev = llm_source(llm, k, n_docs, n_prompts)
        sources[src.name], evals[src.name] = src, ev
    coders = train_coders(specs, sources, steps, workers, retrain, cache_dir)
    torch.set_num_threads(2)
    heldout_feats = {"image": held.latents, **{n: torch.cat([h.reshape(-1, h.shape[-1]) for h in ev.clean])
                                               for n, ev in evals.items()}}
    round_trip = {n: transform_round_trip(s, ("fcm", "dtufc", "dtufc-clip", "dtufc-pwl"), heldout_feats[n])
                  for n, s in sources.items()}
    uncoded: dict[str, Any] = {n: answers_right(llm, ev.k, ev.prompts, lambda h: h) for n, ev in evals.items()}
    rows: list[dict[str, Any]] = []
    for spec in specs:
        entry = coders[spec.name]
        for budget in ("full", "half"):
            for on, src in sources.items():
                if budget == "half" and spec.trained_on not in (on, "mixed"):
                    continue  # the half snapshot answers "did it converge", on what it was trained on
                for q in range(4):
                    model = entry[budget].at_quality(q).eval()
                    if on == "image":
                        m = eval_image(model, src.transforms, spec.domain, src, family, held)
                    else:
                        # The task metrics (the costly part: a generation per prompt) where the report uses
                        # them: coders trained on this source or on the mix, after their full budget.
                        task = budget == "full" and spec.trained_on in (on, "mixed")
                        m = eval_llm(model, src.transforms, spec.domain, src, llm, evals[on], task)
                    rows.append({"coder": spec.name, "trained_on": spec.trained_on, "domain": spec.domain,
                                 "evaluated_on": on, "budget": budget, "quality": q + 1, **m})
                logger.info("%s (%s) on %s: %s", spec.name, budget, on,
                            ", ".join(f"{r['bpfp']:.3f} bpfp/{r['feature_psnr_db']:.1f} dB" for r in rows[-4:]))
    meta = {"steps": steps, "minutes": (time.time() - t0) / 60, "command": command, "n_prompts": n_prompts,
            "peaks": {n: s.peak for n, s in sources.items()},
            "train_seconds": {n: e["seconds"] for n, e in coders.items()},
            "heldout": [f"image: {n_images} diffusion latents of the benchmark's held-out prompts "
                        f"(training: {n_train_latents} sampler latents of the codec-set cache)",
                        f"LLM: {n_prompts} held-out prompts (accuracy) and their prompt+answer texts (PSNR, agreement); "
                        f"training: hidden states of {n_docs} training documents"]}
    write_report(out_dir, rows, round_trip, uncoded, meta)
    return rows


def rebuild_report(out_dir: Path) -> None:
    """Write universal.md and .png again from universal.json (after a change to the report, no re-evaluation)."""
    data = json.loads((out_dir / "universal.json").read_text())
    rows = [{k: ([c == "1" for c in v] if k == "_right" else v) for k, v in r.items()} for r in data["rows"]]
    uncoded = {k: [c == "1" for c in v] for k, v in data["uncoded"].items()}
    (out_dir / "universal.md").write_text(markdown(rows, data["round_trip"], uncoded, data["meta"]))
    plot(rows, out_dir / "universal.png")


def main(argv: list[str] | None = None) -> int:
    from bench.cli import parse

    args = parse("universal", argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report_only:
        rebuild_report(args.out)
        return 0
    steps = args.steps or (30 if args.quick else DEFAULT_STEPS)
    specs = coder_specs()
    if args.coders:
        known = {s.name: s for s in specs}
        unknown = [c for c in args.coders if c not in known]
        if unknown:
            raise SystemExit(f"meg bench universal: unknown coders {unknown}; known: {sorted(known)}")
        specs = [known[c] for c in args.coders]
    command = "meg bench universal" + (" --quick" if args.quick else "") + (f" --steps {steps}" if args.steps else "")
    run(specs, steps, args.jobs, args.prompts or (8 if args.quick else 200), args.n_images or (8 if args.quick else 128),
        60 if args.quick else 800, 256 if args.quick else 1024, args.out, args.retrain, command,
        args.cache_dir or (CACHE_DIR / "quick" if args.quick else CACHE_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())

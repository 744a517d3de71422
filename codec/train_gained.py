"""Train the variable-rate coder (:mod:`codec.variable_rate`) on one or more feature sources.

One trainer serves both uses of issue 13: the coders of a model's codec set (``meg train codecs``, one source)
and the universal experiment (``meg bench universal``: one source, or a mix of sources, each already mapped to
the coder's domain by its own transform).

Loss, per sample with its own quality q: ``lambda_q * 255^2 * D + R``, R the estimated bits per feature point,
D the MSE in the domain the source names: the transform's output (the upstream DT-UFC choice: the index
domain) or, when the source gives an inverse, in feature units through that inverse divided by the source's
FCM span squared (so one lambda ladder lands at comparable rates for every transform). A step draws its batch
from one source (round robin) and random ``patch`` x ``patch`` crops of its planes, as the DT-UFC reference
trains on patches.

Budget: a fixed number of steps (``meg train codecs`` prints the time it expects); a snapshot of the same run
is kept at half the steps so benchmarks can show whether the second half still moved the curve. The learning
rate is constant (``lr``) and drops tenfold for the last 10 % of each half, so both snapshots are annealed.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import functools
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codec.learned import CoderConfig, build_model, export_state, load_exported, pad_to_multiple
from codec.train_coders import optimise_step
from codec.variable_rate import GainedMeanScale, lambda_of, per_sample_bpfp, quality_count

log = logging.getLogger(__name__)


@dataclass
class TrainSource:
    """Training planes of one feature source, in the coder's domain."""

    name: str
    planes: torch.Tensor  # (n, 1, H, W), H and W >= the patch size
    #: domain -> feature units (differentiable), for losses in feature units; None: loss in the domain
    inverse: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: multiplies the MSE (1 / FCM span^2 with an inverse; 1 in [0, 1] domains)
    dist_scale: float = 1.0


@dataclass(frozen=True)
class GainedJob:
    """One training run of the variable-rate coder."""

    steps: int
    batch: int = 8
    patch: int = 32
    N: int = 64
    M: int = 96
    lr: float = 1e-3
    threads: int = 1
    seed: int = 0


@dataclass
class GainedResult:
    """The trained model and its half-budget snapshot, both as shipped (float16 transforms), and a log."""

    config: CoderConfig
    model: GainedMeanScale
    half: GainedMeanScale
    log: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def _crop(planes: torch.Tensor, n: int, patch: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(planes), (n,), generator=gen)
    h, w = planes.shape[-2:]
    out = []
    for i in idx.tolist():
        top = int(torch.randint(h - patch + 1, (1,), generator=gen))
        left = int(torch.randint(w - patch + 1, (1,), generator=gen))
        out.append(planes[i, :, top:top + patch, left:left + patch])
    return torch.stack(out)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Constant, tenfold lower in the last 10 % of each half of the run."""
    half = max(1, steps // 2)
    into = step % half if step < 2 * half else half
    return lr * (0.1 if into >= int(0.9 * half) else 1.0)


def shipped_copy(model: GainedMeanScale) -> GainedMeanScale:
    """What ships: float16 transforms, CDFs rebuilt, eval mode (numbers are measured on this)."""
    twin = copy.deepcopy(model)
    return load_exported(twin, export_state(model))  # type: ignore[return-value]


def train_gained(job: GainedJob, sources: Sequence[TrainSource]) -> GainedResult:
    """Train one variable-rate coder on ``sources`` (module docstring)."""
    if not sources:
        raise ValueError("no training sources")
    for src in sources:
        if min(src.planes.shape[-2:]) < job.patch:
            raise ValueError(f"source {src.name}: planes {tuple(src.planes.shape)} are smaller than the patch {job.patch}")
    channels = {int(src.planes.shape[1]) for src in sources}
    if len(channels) != 1:
        raise ValueError(f"sources disagree on the channel count: {sorted(channels)}")
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    in_ch = channels.pop()
    cfg = CoderConfig("gained" if in_ch == 1 else "gained-native", in_ch=in_ch, N=job.N, M=job.M,
                      levels=quality_count())
    model: GainedMeanScale = build_model(cfg)  # type: ignore[assignment]
    model.train()
    main_params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
    aux_params = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
    opt = torch.optim.Adam(main_params, lr=job.lr)
    aux_opt = torch.optim.Adam(aux_params, lr=1e-3)
    gen = torch.Generator().manual_seed(job.seed)
    t0 = time.time()
    history: list[dict[str, float]] = []
    half: GainedMeanScale | None = None
    ema: dict[str, float] = {}
    points = cfg.in_ch * job.patch * job.patch  # real feature values per sample: the rate is bits per value
    for step in range(job.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, job.steps, job.lr)
        src = sources[step % len(sources)]
        x = pad_to_multiple(_crop(src.planes, job.batch, job.patch, gen))  # tiny planes: the coder needs x16
        q = torch.randint(quality_count(), (job.batch,), generator=gen)
        out = model(x, q)
        if src.inverse is None:
            err = (out["x_hat"] - x) ** 2
        else:
            err = (src.inverse(out["x_hat"]) - src.inverse(x)) ** 2
        mse = err.flatten(1).mean(1) * src.dist_scale
        rate = per_sample_bpfp(out["likelihoods"], points)
        loss = (lambda_of(q) * 255 ** 2 * mse + rate).mean()
        optimise_step(model, loss, opt, aux_opt, main_params)
        for key, value in (("loss", loss.item()), ("bpfp", rate.detach().mean().item()), ("mse", mse.detach().mean().item())):
            ema[key] = value if key not in ema else 0.98 * ema[key] + 0.02 * value
        if step % 250 == 0 or step == job.steps - 1:
            history.append({"step": step, "seconds": round(time.time() - t0, 1), **{k: round(v, 5) for k, v in ema.items()}})
            log.info("gained coder step %d/%d: loss %.4f, %.3f bpfp, mse %.3g (%.0f s)", step, job.steps,
                     ema["loss"], ema["bpfp"], ema["mse"], time.time() - t0)
        if step + 1 == job.steps // 2:
            half = shipped_copy(model)
            model.train()
    final = shipped_copy(model)
    return GainedResult(cfg, final, half if half is not None else final, history, round(time.time() - t0, 1))


def ladder_entries(state_key: str, cfg: CoderConfig, info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-quality metadata entries (``<state>.q1`` ...) of one trained variable-rate model."""
    lams = lambda_of(torch.arange(quality_count())).tolist()
    return {f"{state_key}.q{q + 1}": {"config": cfg.to_json(), "state": state_key, "quality_index": q,
                                       "lambda": round(lams[q], 6), **info}
            for q in range(cfg.levels)}


@dataclass(frozen=True)
class SourceTransforms:
    """The fitted transforms of one feature source: FCM range, DT-UFC centres and clipped-fit centres.

    The same maps the codec stages of :mod:`codec.transforms` apply at run time, as plain functions of
    tensors, for training and for benchmarks that handle sources without a codec set on disk.
    """

    lo: float
    hi: float
    centres: torch.Tensor  # (L,)
    clip_centres: torch.Tensor  # (L,)

    @staticmethod
    def fit(samples: torch.Tensor, bits: int = 8) -> "SourceTransforms":
        from codec.transforms import fit_fcm_range, kmeans_1d

        flat = samples.reshape(-1)
        if flat.numel() > 4_000_000:  # K-means on a fixed subsample: exact enough, bounded time
            flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:4_000_000]]
        lo, hi = fit_fcm_range(flat)
        return SourceTransforms(lo, hi, kmeans_1d(flat, 1 << bits), kmeans_1d(flat.clamp(lo, hi), 1 << bits))

    @property
    def span(self) -> float:
        return self.hi - self.lo

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        from codec.transforms import dtufc_index_forward, fcm_forward, pwl_forward

        if domain == "identity":
            return x
        if domain == "fcm":
            return fcm_forward(x, self.lo, self.hi)
        if domain == "dtufc":
            return dtufc_index_forward(x, self.centres)
        if domain == "dtufc-clip":
            return dtufc_index_forward(x, self.clip_centres)
        if domain == "dtufc-pwl":
            return pwl_forward(x, self.centres)
        raise ValueError(f"unknown domain {domain!r}")

    def inverse(self, u: torch.Tensor, domain: str) -> torch.Tensor:
        """The decoder side's inverse (hard for the index domains, as the codec stages)."""
        from codec.transforms import dtufc_index_inverse, fcm_inverse, pwl_inverse

        if domain == "identity":
            return u
        if domain == "fcm":
            return fcm_inverse(u, self.lo, self.hi)
        if domain == "dtufc":
            return dtufc_index_inverse(u, self.centres)
        if domain == "dtufc-clip":
            return dtufc_index_inverse(u, self.clip_centres)
        if domain == "dtufc-pwl":
            return pwl_inverse(u, self.centres)
        raise ValueError(f"unknown domain {domain!r}")

    def train_source(self, name: str, planes: torch.Tensor, domain: str) -> TrainSource:
        """Training planes in ``domain`` with the loss each transform is trained with (module docstring):
        index / [0, 1] domain for fcm, dtufc, dtufc-clip; feature units over the FCM span for identity and
        dtufc-pwl (through the differentiable piecewise-linear inverse)."""
        from codec.transforms import pwl_inverse

        u = self.forward(planes, domain)
        if domain == "identity":
            return TrainSource(name, u, None, 1.0 / self.span ** 2)
        if domain == "dtufc-pwl":  # a partial of a module function pickles into training processes
            return TrainSource(name, u, functools.partial(pwl_inverse, centres=self.centres), 1.0 / self.span ** 2)
        return TrainSource(name, u)


def save_transforms(out: Path, set_name: str, tr: SourceTransforms, **extra: object) -> None:
    """Write the FCM range, DT-UFC centres and clipped-fit centres as the codec stages read them."""
    from codec.transforms import save_dtufc_centres, save_fcm_stats

    save_fcm_stats(out / f"fcm_{set_name}.json", tr.lo, tr.hi, percentiles=[0.1, 99.9], **extra)
    save_dtufc_centres(out / f"dtufc_{set_name}.safetensors", tr.centres.view(1, -1))
    save_dtufc_centres(out / f"dtufcclip_{set_name}.safetensors", tr.clip_centres.view(1, -1))


def load_transforms(out: Path, set_name: str) -> SourceTransforms:
    import json

    from safetensors.torch import load_file

    fcm = json.loads((out / f"fcm_{set_name}.json").read_text())
    centres = load_file(str(out / f"dtufc_{set_name}.safetensors"))["centres"][0]
    clip = load_file(str(out / f"dtufcclip_{set_name}.safetensors"))["centres"][0]
    return SourceTransforms(float(fcm["lo"]), float(fcm["hi"]), centres, clip)


def _train_job(args: tuple[GainedJob, list[TrainSource]]) -> GainedResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    return train_gained(*args)


def train_many(jobs: Sequence[tuple[GainedJob, list[TrainSource]]], workers: int,
               on_result: Callable[[int, GainedResult], None] | None = None) -> list[GainedResult]:
    """Run several trainings, ``workers`` processes of one thread each (results in job order). ``on_result`` sees
    each result as soon as it and the ones before it are done (so a caller can save them before the rest end)."""
    from tqdm.auto import tqdm

    out: list[GainedResult] = []
    with contextlib.ExitStack() as stack:
        if workers <= 1 or len(jobs) <= 1:
            results: Iterable[GainedResult] = (train_gained(*job) for job in jobs)
        else:
            pool = stack.enter_context(cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")))
            results = pool.map(_train_job, jobs)
        for i, res in enumerate(tqdm(results, total=len(jobs), desc="gained coders", unit="coder")):
            out.append(res)
            if on_result:
                on_result(i, res)
    return out


@torch.no_grad()
def heldout_stats(model: GainedMeanScale, test: torch.Tensor) -> list[dict[str, float]]:
    """Per quality: likelihood-estimated bpfp and domain MSE on held-out planes (padded as the codec does)."""
    x = pad_to_multiple(test)
    rows = []
    for q in range(model.levels):
        out = model(x, q)
        rows.append({"heldout_est_bpfp": round(float(per_sample_bpfp(out["likelihoods"], x[0].numel()).mean()), 4),
                     "heldout_mse_domain": float(((out["x_hat"] - x) ** 2).mean())})
    return rows


def train_set_coders(train: torch.Tensor, test: torch.Tensor, out: Path, set_name: str, domains: Sequence[str],
                     steps: int, workers: int, extra: dict[str, Any], native_steps: int = 0) -> dict[str, Any]:
    """Train a variable-rate coder per domain on tiled latents (and, with ``native_steps``, one on the latents'
    own channels, ``gained-native.identity``) and merge them into ``learned_<set>`` of the codec set ``out``
    (whose transforms must be fitted already). Returns per-coder held-out stats."""
    from codec.learned import merge_weights_set
    from codec.packing import tile_planes

    tr = load_transforms(out, set_name)
    planes, test_planes = tile_planes(train), tile_planes(test)
    job = GainedJob(steps=steps, patch=min(32, *planes.shape[-2:]))
    jobs = [(job, [tr.train_source(d, planes, d)]) for d in domains]
    keys = [(f"gained.{d}", d, test_planes) for d in domains]
    if native_steps:
        jobs.insert(0, (GainedJob(steps=native_steps, patch=min(16, *train.shape[-2:])),
                        [tr.train_source("native", train, "identity")]))
        keys.insert(0, ("gained-native.identity", "identity", test))
    results = train_many(jobs, workers)
    states, entries, stats = {}, {}, {}
    for (key, domain, held_planes), (run, _), res in zip(keys, jobs, results):
        held = heldout_stats(res.model, tr.forward(held_planes, domain))
        info = {"steps": run.steps, "batch": run.batch, "patch": run.patch, "train_seconds": res.seconds}
        ladder = ladder_entries(key, res.config, info)
        for (k, entry), h in zip(ladder.items(), held):
            entry.update(h)
            stats[k] = entry
        states[key] = export_state(res.model)
        entries.update(ladder)
    merge_weights_set(out / f"learned_{set_name}", states, entries, {**extra, "steps": steps, "native_steps": native_steps})
    return stats

"""Fit the distribution transforms and train the learned source coders on a model's latents.

The usual entry point is ``meg train codecs --source image --model-dir DIR`` (:mod:`codec.fit_image`), which
trains on the latents the edge really sends (the sampler's final latents) and calls :func:`fit_transforms` and
:func:`train_learned_coders` from here. ``python -m codec.train_coders [--quick] [--jobs 2] [--model-dir DIR]``
is the older, shapes-specific path (VAE means of rendered shapes); both write into the model's image codec
set, ``<model dir>/codecs/image-k0`` (:mod:`codec.image_sets`), and refresh its config.json:

* ``fcm_<set>.json``            FCM truncation range (0.1/99.9 percentiles of the training features)
* ``dtufc_<set>.safetensors``   DT-UFC K-means centres (2^8, one global codebook)
* ``learned_<set>.safetensors`` every coder ``<model>.<domain>.q<k>`` (float16 transforms)
* ``learned_<set>.json``        their configs, lambdas and training / held-out statistics

Training data of this CLI are the embedded model's latents: ``vae.encode(shapes images).latent_dist.mean`` (unscaled VAE
latents, the space ``models.sampling.generate_latents`` returns and the edge sends), plus generated
latents when the sampler is available. Until the real model
exists (``models/shapes_v1/metrics.json``), a randomly initialised VAE of the same architecture stands in
(``--source standin``), so the pipeline can be exercised end to end; the JSON records which was used.

Loss is the reference one, ``lambda * 255^2 * MSE + rate`` with rate in bits per feature point, on the
transformed features (in [0, 1] for fcm/dtufc). For the identity domain the MSE is measured on features
divided by the FCM range, so one lambda ladder lands at comparable rates in every domain. Qualities are
trained as a ladder: q1 from scratch, each next quality warm-started from the previous one (half the
steps), which is what keeps CPU training of all coders within ~25 minutes.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from codec.image_sets import image_set_dir, write_image_set_config
from codec.learned import COMPACT_KINDS, DOMAINS, CoderConfig, build_model, model_key, round_trip_half, save_weights_set
from codec.packing import tile_planes
from codec.transforms import DtufcStage, FcmStage
from codec.base import StageContext

log = logging.getLogger(__name__)

#: Rate-distortion trade-offs of the quality ladder (CompressAI's q1, q3, q5, q7 image lambdas).
LAMBDAS: tuple[float, ...] = (0.0018, 0.0067, 0.025, 0.0932)
REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "shapes_v1"


@dataclass(frozen=True)
class FeatureSets:
    """Training and held-out latents (N, C, H, W) plus where they came from."""

    train: torch.Tensor
    test: torch.Tensor
    source: str


def real_model_ready(model_dir: Path = MODEL_DIR) -> bool:
    """The model engineer's completion signal."""
    return (model_dir / "metrics.json").is_file() and (model_dir / "vae").is_dir()


def load_vae(model_dir: Path = MODEL_DIR, standin: bool = False) -> torch.nn.Module:
    """The embedded model's VAE, or a randomly initialised one of the same architecture."""
    from models import components  # lazy: codec must not need the model family at import time

    if standin:
        torch.manual_seed(0)
        return components.new_vae().eval()
    return components.load_vae(model_dir)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, seeds: list[int] | range, batch: int = 64) -> torch.Tensor:
    """Unscaled VAE latent means of rendered shapes images (what the sampler returns, too)."""
    from models import shapes

    out = []
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        images, _, _ = shapes.render_batch(seeds[i:i + batch])
        out.append(vae.encode(images).latent_dist.mean)
    return torch.cat(out)


def collect_features(n_train: int, n_test: int, source: str = "auto", model_dir: Path = MODEL_DIR,
                     n_generated: int = 0) -> FeatureSets:
    """Latents to train on and held-out latents to evaluate on (disjoint seed ranges)."""
    from models import shapes

    standin = source == "standin" or (source == "auto" and not real_model_ready(model_dir))
    if source == "real" and not (model_dir / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}/vae not found: the real model is not there")
    vae = load_vae(model_dir, standin=standin)
    t0 = time.time()
    train = encode_images(vae, range(n_train))
    test = encode_images(vae, range(shapes.HELDOUT_SEED_BASE, shapes.HELDOUT_SEED_BASE + n_test))
    label = "standin-random-vae" if standin else f"vae-mean:{model_dir.name}:{_vae_digest(model_dir)}"
    if not standin and n_generated > 0:
        extra = _sampled_latents(model_dir, n_generated)
        if extra is not None:
            train = torch.cat([train, extra])
            label += "+generated"
    log.info("encoded %d train / %d held-out latents (%s) in %.1fs", len(train), len(test), label, time.time() - t0)
    return FeatureSets(train, test, label)


def _vae_digest(model_dir: Path) -> str:
    """Short hash of the VAE weights the features came from (a retrained VAE needs retrained coders)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((model_dir / "vae").glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _sampled_latents(model_dir: Path, n: int) -> torch.Tensor | None:
    """Latents the diffusion model itself generates, when ``models.sampling.generate_latents`` exists."""
    try:
        from models import sampling  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(sampling, "generate_latents", None)
    if fn is None:
        return None
    try:
        from models import components, shapes

        combos = shapes.COMBINATIONS
        captions = [shapes.make_caption(*combos[(i * 7) % len(combos)]) for i in range(n)]
        t0 = time.time()
        vae = components.load_vae(model_dir)
        latents = fn(components.load_tokenizer(model_dir), components.load_text_encoder(model_dir),
                     components.load_unet(model_dir), components.load_scheduler(model_dir), captions,
                     list(range(n)), scaling_factor=float(vae.config.scaling_factor))
        log.info("generated %d latents with the diffusion sampler in %.0fs", n, time.time() - t0)
        return latents.float().reshape(-1, *latents.shape[-3:])
    except Exception as exc:  # an optional extra source must never stop training
        log.warning("generate_latents unavailable (%s); training on VAE latents only", exc)
        return None


def to_domain(x: torch.Tensor, domain: str, weights_dir: Path, set_name: str) -> torch.Tensor:
    """Features (N, C, H, W) -> transformed and tiled planes (N, 1, rows*H, cols*W), as the codec does."""
    params = {"fcm_stats": set_name, "dtufc_centres": set_name}
    ctx = StageContext(params=params)
    if domain == "fcm":
        x = FcmStage(params, weights_dir).forward({"x": x}, ctx)["x"]
    elif domain == "dtufc":
        x = DtufcStage(params, weights_dir).forward({"x": x}, ctx)["x"]
    return tile_planes(x)


@dataclass(frozen=True)
class TrainJob:
    kind: str
    domain: str
    steps: int
    batch: int
    dist_scale: float
    threads: int
    seed: int = 0


def _bpfp(likelihoods: dict[str, torch.Tensor], numel: int) -> torch.Tensor:
    return sum(-torch.log2(v.clamp_min(1e-9)).sum() for v in likelihoods.values()) / numel


def optimise_step(model: torch.nn.Module, loss: torch.Tensor, opt: torch.optim.Optimizer,
                  aux_opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """One step of a CompressAI coder: the rate-distortion loss (gradients clipped at 1), then the entropy
    bottleneck's auxiliary quantile loss with its own optimiser."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    aux = model.aux_loss()
    aux_opt.zero_grad()
    aux.backward()
    aux_opt.step()


def train_ladder(job: TrainJob, train: torch.Tensor, test: torch.Tensor) -> dict[str, Any]:
    """Train one (model, domain) across the lambda ladder; returns exported states and stats per quality."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    cfg = CoderConfig(job.kind)
    model = build_model(cfg)
    results: dict[str, Any] = {}
    t_all = time.time()
    for q, lam in enumerate(LAMBDAS, start=1):
        steps = job.steps if q == 1 else max(1, job.steps // 2)
        model.train()
        main_params = [p for n, p in model.named_parameters() if not n.endswith("quantiles")]
        aux_params = [p for n, p in model.named_parameters() if n.endswith("quantiles")]
        opt = torch.optim.Adam(main_params, lr=1e-3)
        aux_opt = torch.optim.Adam(aux_params, lr=1e-3)
        t0 = time.time()
        gen = torch.Generator().manual_seed(job.seed * 100 + q)
        ema = None
        for step in range(steps):
            if step == int(steps * 0.8):
                for g in opt.param_groups:
                    g["lr"] = 1e-4
            x = train[torch.randint(len(train), (job.batch,), generator=gen)]
            out = model(x)
            mse = torch.mean((out["x_hat"] - x) ** 2) * job.dist_scale
            rate = _bpfp(out["likelihoods"], x.numel())
            loss = lam * 255 ** 2 * mse + rate
            optimise_step(model, loss, opt, aux_opt, main_params)
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            if step % 200 == 0 or step == steps - 1:
                log.info("%s/%s q%d step %d/%d loss %.4f (rate %.3f bpfp, mse %.3g)", job.kind, job.domain, q,
                         step, steps, ema, rate.item(), mse.item())
        shipped = round_trip_half(model)  # numbers below are those of the float16 weights that ship
        with torch.no_grad():
            out = shipped(test)
            mse_t = float(torch.mean((out["x_hat"] - test) ** 2))
            rate_t = float(_bpfp(out["likelihoods"], test.numel()))
        from codec.learned import export_state

        results[model_key(job.kind, job.domain, q)] = {
            "state": export_state(shipped),
            "config": cfg,
            "info": {"lambda": lam, "steps": steps, "train_seconds": round(time.time() - t0, 1),
                     "final_train_loss": round(ema or 0.0, 5), "heldout_est_bpfp": round(rate_t, 4),
                     "heldout_mse_domain": mse_t, "dist_scale": job.dist_scale},
        }
        log.info("%s/%s q%d done in %.0fs: held-out %.3f bpfp (likelihood estimate), domain MSE %.3g",
                 job.kind, job.domain, q, time.time() - t0, rate_t, mse_t)
        model = shipped.train()  # warm start the next quality
        for m in model.modules():
            m.requires_grad_(True)
    log.info("%s/%s ladder finished in %.0fs", job.kind, job.domain, time.time() - t_all)
    return results


def _run_job(args: tuple[TrainJob, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    try:
        os.nice(10)
    except OSError:
        pass
    return train_ladder(*args)


def default_pairs() -> list[tuple[str, str]]:
    """Every per-quality family on untransformed latents (the transforms are trained with the variable-rate
    coder, :mod:`codec.train_gained`)."""
    return [(k, "identity") for k in COMPACT_KINDS]


def fit_transforms(train: torch.Tensor, out: Path, set_name: str, source: str) -> tuple[float, float]:
    """Fit FCM's range and DT-UFC's centres (plain and clip-fitted) on ``train`` latents and write them into
    ``out`` as ``meg train codecs`` does (:class:`codec.train_gained.SourceTransforms`); returns the FCM range."""
    from codec.train_gained import SourceTransforms, save_transforms  # it imports this module

    tr = SourceTransforms.fit(train)
    save_transforms(out, set_name, tr, source=source, n_latents=len(train))
    log.info("fitted FCM range [%.3f, %.3f] and %d DT-UFC centres", tr.lo, tr.hi, tr.centres.numel())
    return tr.lo, tr.hi


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``kind:domain,kind:domain`` → pairs; ValueError naming an unknown one."""
    pairs = [tuple(item.split(":", 1)) for item in text.split(",") if item]
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in COMPACT_KINDS or pair[1] not in DOMAINS:
            raise ValueError(f"unknown coder pair {':'.join(pair)!r} (kinds {COMPACT_KINDS}, domains {DOMAINS}; "
                             "the variable-rate coder is trained by --gained-domains)")
    return pairs  # type: ignore[return-value]


def train_learned_coders(train: torch.Tensor, test: torch.Tensor, out: Path, set_name: str,
                         pairs: list[tuple[str, str]], fcm_range: tuple[float, float], steps: int, batch: int,
                         jobs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Train every (kind, domain) in ``pairs`` across the lambda ladder and write ``learned_<set>.*`` into
    ``out``, which must already be a set holding the FCM / DT-UFC fit (the domains are computed with it).
    Returns the metadata written (``models`` has each coder's held-out rate)."""
    lo, hi = fcm_range
    data = {d: (to_domain(train, d, out, set_name), to_domain(test, d, out, set_name)) for d in {d for _, d in pairs}}
    dist_scale = {"identity": 1.0 / (hi - lo) ** 2, "fcm": 1.0, "dtufc": 1.0}
    work = [(TrainJob(k, d, steps, batch, dist_scale[d], threads=1), *data[d]) for k, d in pairs]
    # Heaviest first so the two workers finish together.
    weight = {"elic": 3, "mshyperprior": 2, "hyperprior": 2, "factorized": 1}
    work.sort(key=lambda j: -weight[j[0].kind])
    trained: dict[str, Any] = {}
    t_start = time.time()
    from tqdm.auto import tqdm

    with tqdm(total=len(work), desc="learned coders", unit="coder") as bar:
        if jobs > 1 and len(work) > 1:
            with cf.ProcessPoolExecutor(max_workers=jobs) as pool:
                for res in pool.map(_run_job, work):
                    trained.update(res)
                    bar.update()
        else:
            for job in work:
                trained.update(train_ladder(*job))
                bar.update()
    models = {key: (build_model(v["config"]), v["config"], v["info"]) for key, v in trained.items()}
    from codec.learned import load_exported

    for key, v in trained.items():
        load_exported(models[key][0], v["state"])
    train_seconds = sum(v["info"]["train_seconds"] for v in trained.values())
    meta = {**extra, "n_train": len(train), "n_test": len(test), "lambdas": list(LAMBDAS), "fcm_range": [lo, hi],
            "cpu_train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
            "batch": batch, "steps_q1": steps, "torch": torch.__version__}
    save_weights_set(out / f"learned_{set_name}", models, meta)
    return {**meta, "models": {k: v["info"] for k, v in trained.items()}}


def rate_monotonic(models: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Per ``kind.domain``: whether the held-out rate rises strictly with the quality (q1 < q2 < ...), which
    is what a quality ladder promises the link adaptation."""
    ladders: dict[str, list[tuple[int, float]]] = {}
    for key, info in models.items():
        stem, q = key.rsplit(".q", 1)
        ladders.setdefault(stem, []).append((int(q), float(info["heldout_est_bpfp"])))
    out = {}
    for stem, points in sorted(ladders.items()):
        rates = [r for _, r in sorted(points)]
        out[stem] = all(b > a for a, b in zip(rates, rates[1:]))
        if not out[stem]:
            log.warning("%s: held-out rate is not monotonic in quality: %s bpfp", stem, [round(r, 4) for r in rates])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m codec.train_coders", description=__doc__.split("\n\n")[0])
    p.add_argument("--set-name", default="shapes_v1", help="weights set name (files <kind>_<set>.*)")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="the model whose latents are coded")
    p.add_argument("--out", type=Path, default=None, help="default: the model's codec set, <model dir>/codecs/image-k0")
    p.add_argument("--source", choices=("auto", "real", "standin"), default="auto")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--n-generated", type=int, default=0,
                   help="extra training latents from the diffusion sampler (slow on CPU: 20 guided steps each)")
    p.add_argument("--steps", type=int, default=800, help="steps for q1; later qualities get half")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes (1 thread each)")
    p.add_argument("--models", default=",".join(COMPACT_KINDS))
    p.add_argument("--pairs", default="", help="explicit kind:domain list, e.g. hyperprior:dtufc,elic:identity")
    p.add_argument("--quick", action="store_true", help="smoke run: few latents, 20 steps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(processName)s %(message)s")
    if args.quick:
        args.n_train, args.n_test, args.steps = min(args.n_train, 128), min(args.n_test, 32), min(args.steps, 20)
    out = args.out or image_set_dir(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    feats = collect_features(args.n_train, args.n_test, args.source, model_dir=args.model_dir,
                             n_generated=args.n_generated)
    try:
        pairs = parse_pairs(args.pairs) if args.pairs else [
            (k, d) for k, d in default_pairs() if k in set(args.models.split(","))]
    except ValueError as exc:
        p.error(str(exc))
    made_by = {"method": "python -m codec.train_coders", "features": feats.source,
               "command": "python -m codec.train_coders " + " ".join(argv if argv is not None else sys.argv[1:])}
    lo, hi = fit_transforms(feats.train, out, args.set_name, feats.source)
    # The domains are computed through the codec's own stages, which read a set: hash what is there so far.
    write_image_set_config(out, args.model_dir, {**made_by, "status": "partial"}, set_name=args.set_name)
    meta = train_learned_coders(feats.train, feats.test, out, args.set_name, pairs, (lo, hi), args.steps,
                                args.batch, args.jobs, {"source": feats.source})
    write_image_set_config(out, args.model_dir, {**made_by, "rate_monotonic": rate_monotonic(meta["models"])},
                           set_name=args.set_name)
    size = sum(f.stat().st_size for f in out.glob(f"*_{args.set_name}.*"))
    log.info("wrote weights set %r to %s (%.2f MB) — CPU training %.0fs, wall %.0fs", args.set_name, out,
             size / 1e6, meta["cpu_train_seconds"], time.time() - t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the image codec set of one diffusion model: ``meg train codecs --source image --model-dir DIR``.

Why on the sampler's latents: the edge sends the *final latents of its own denoising loop* (VAE space), not VAE
encodings of real images; their range and peakiness differ, and FCM ranges, DT-UFC centres, learned coders and
JSCC links fitted on the wrong distribution waste rate or clip. So the latents are collected with the model's
own backend (:meth:`models.backends.TextToImageBackend.generate`, the loop of :mod:`models.denoising` the edge
runs), from any local diffusers folder (the embedded ``shapes_v1``, SD 1.5, ...).

Parts, each skipped when its output is already in the set folder (the run is resumable; ``--force`` redoes):

1. ``latents``: ``--latents`` training + ``--test-latents`` held-out latents (prompts: ``--prompts FILE``, one
   a line, else the shapes captions), cached per batch under ``--work-dir``;
2. ``fcm`` / ``dtufc``: FCM range (0.1 / 99.9 percentiles), 256 DT-UFC centres and 256 centres fitted on
   FCM-clipped values (:class:`codec.train_gained.SourceTransforms`);
3. ``learned``: the compact per-quality coders of ``--pairs`` across the quality ladder
   (:func:`codec.train_coders.train_learned_coders`); the held-out rate must rise with the quality
   (recorded as ``rate_monotonic``, warned about when not);
3b. ``gained``: the variable-rate coder (N=64, M=96, four qualities) in every domain of ``--gained-domains``
   (:func:`codec.train_gained.train_set_coders`), ``--gained-steps`` steps each;
4. ``jscc_full`` / ``jscc_e2e``: the JSCC links through the emulator's channel blocks and the model's frozen
   device decoder (:func:`codec.train_jscc.train_variant`);
5. ``config.json``: source, model id, split, set name, how each part was made, per-file SHA-256 and the
   content hash (rewritten after every part, so a partial set is a valid set of what it holds).

``--adopt OLD_DIR`` instead copies the files of a folder of the old global ``codec/weights`` layout into the
model's set and writes its config.json (nothing is refitted; ``made_by`` says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from pathlib import Path

import torch

from codec.image_sets import (
    ADOPT_COMMAND, FIT_COMMAND, adopt_image_set, image_set_dir, refresh_image_set_config, sanitize_set_name,
)
from codec.sets import CONFIG_FILE, IMAGE_SOURCE
from codec.train_jscc import VARIANTS as JSCC_VARIANTS

logger = logging.getLogger(__name__)

FIT_SEED = 11
DEFAULT_LATENTS = 1024
DEFAULT_TEST_LATENTS = 128
DEFAULT_SAMPLING_STEPS = 20
DEFAULT_GUIDANCE = 4.0
DEFAULT_CODER_STEPS = 800
#: The compact per-quality families code untransformed latents; the transforms go with the variable-rate coder.
DEFAULT_PAIRS = "factorized:identity,hyperprior:identity,mshyperprior:identity,elic:identity"
DEFAULT_GAINED_DOMAINS = "identity,fcm,dtufc,dtufc-clip,dtufc-pwl"
#: ~75 ms a step on one core at N=64, M=96, batch 8: about 5 minutes a coder.
DEFAULT_GAINED_STEPS = 4000
#: The coder the testbed serves at low rate: trained longer (its curve still moved from 2000 to 4000 steps).
DEFAULT_NATIVE_STEPS = 8000
LATENTS_FILE = "latents.pt"
#: The JSCC links of the set, each a part of its own (``--redo jscc_e2e_learned``).
JSCC_LINKS = tuple(JSCC_VARIANTS)


def load_prompts(path: Path | None) -> list[str]:
    """Prompts to sample with: the lines of ``path``, else the shapes captions (every colour, shape and
    background), which any text-to-image model can draw."""
    if path is not None:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} holds no prompts")
        return prompts
    from models import shapes

    return [shapes.make_caption(*combo) for combo in shapes.COMBINATIONS]


@torch.no_grad()
def collect_latents(model_dir: Path, n: int, cache: Path, prompts: list[str], steps: int, guidance: float,
                    seed: int, batch: int, device: str, height: int = 0, width: int = 0) -> torch.Tensor:
    """``n`` final latents (N, C, h, w) in VAE space, exactly as the edge sends them: the model's backend runs
    its denoising loop for ``steps`` steps. Resumable: each finished batch is appended to ``cache``."""
    from tqdm.auto import tqdm

    from models.backends import BatchItem, load_backend

    done = torch.load(cache) if cache.is_file() else None
    have = 0 if done is None else int(done.shape[0])
    if have >= n:
        logger.info("latents: %d cached in %s, nothing to sample", have, cache)
        return done[:n]
    backend = load_backend(model_dir, device=device)
    shape = backend.latent_shape(height, width)
    parts = [] if done is None else [done]
    t0 = time.perf_counter()
    with tqdm(total=n, initial=have, desc="sampling latents", unit="latent") as bar:
        for start in range(have, n, batch):
            idx = range(start, min(start + batch, n))
            items = [BatchItem(prompts[i % len(prompts)], seed * 1_000_003 + i, guidance, threading.Event()) for i in idx]
            result = backend.generate(items, steps, shape, split_step=0)
            parts.append(torch.stack([t for t in result.latents if t is not None]).float())
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.cat(parts), cache)
            bar.update(len(idx))
            if start == have:
                per = (time.perf_counter() - t0) / len(idx)
                logger.info("sampling: %.2f s per latent → about %.1f min for the remaining %d", per,
                            per * (n - start - len(idx)) / 60, n - start - len(idx))
    return torch.cat(parts)[:n]


def _jscc_decoder(model_dir: Path) -> tuple[str, torch.nn.Module, torch.nn.Module]:
    """(name, frozen device decoder, VAE): the link is trained through the decoder the device uses for noisy
    links (robust, else tiny, else the VAE's own decoder)."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae")).eval()
    for name in ("robust_decoder", "tiny_decoder"):
        if (model_dir / name / "config.json").is_file():
            return name, AutoencoderTiny.from_pretrained(str(model_dir / name)).eval(), vae
    return "vae", vae, vae


def train_jscc_links(model_dir: Path, out: Path, train: torch.Tensor, test: torch.Tensor, names: list[str],
                     latent_steps: int, steps: int, minutes: float, seed: int) -> None:
    """Train the JSCC links ``names`` (:data:`codec.train_jscc.VARIANTS`) with the existing trainer and write
    each into the set as soon as it is done."""
    from codec.train_jscc import MERGE_MAPS, VARIANTS, build_parser, evaluate, train_variant
    from models.decoders import decode_latents

    decoder_name, decoder, vae = _jscc_decoder(model_dir)
    decoder.requires_grad_(False)
    targets = torch.cat([decode_latents(vae, train[i:i + 32]) for i in range(0, len(train), 32)])
    val_targets = torch.cat([decode_latents(vae, test[i:i + 32]) for i in range(0, len(test), 32)])
    args = build_parser().parse_args(["--latent-steps", str(latent_steps), "--steps", str(steps),
                                      "--minutes", str(minutes), "--seed", str(seed), "--decoder", decoder_name,
                                      "--pixel-batch", str(min(16, len(train))), "--batch", str(min(64, len(train)))])
    for name in names:
        net = train_variant(name, VARIANTS[name], train, targets, decoder, args, torch.device("cpu"))
        with torch.no_grad():
            net.config["val_psnr_db"] = evaluate(net, VARIANTS[name], test, val_targets, decoder,
                                                 MERGE_MAPS.get(name, "global"))
        net.config["trained_on"] = f"{model_dir.name}: sampler latents"
        net.save(out / f"{name}.safetensors")
        refresh_image_set_config(out, model_dir, name, {
            "method": "codec.train_jscc.train_variant", "decoder": decoder_name,
            "latent_steps": latent_steps, "pixel_steps": steps, "train_steps": net.config["train_steps"],
            "val_psnr_db": net.config["val_psnr_db"]})
        logger.info("%s: %d steps, val PSNR %s", name, net.config["train_steps"], net.config["val_psnr_db"])


def log_budget(args: argparse.Namespace, pairs: list[tuple[str, str]], todo: list[str]) -> None:
    """Say up front what the run will do and what bounds its time (the parts skipped cost nothing)."""
    coder_steps = args.coder_steps + 3 * max(1, args.coder_steps // 2)
    logger.info(
        "time budget: parts to do %s; sampling %d latents × %d steps (timed after the first batch); "
        "%d learned coders × %d steps (q1 + 3 half-steps ladders, %d jobs; ~1-3 min per 1000 steps each on a CPU "
        "core); %d variable-rate coders × %d steps (~75 ms a step on a core: ~%.0f min each) + the native one × %d "
        "steps; "
        "JSCC %s × (%d latent + %d pixel steps), capped at %.1f min each",
        ", ".join(todo) or "none", args.latents + args.test_latents, args.sampling_steps, len(pairs), coder_steps,
        args.jobs, len([d for d in args.gained_domains.split(",") if d]) if "gained" in todo else 0,
        args.gained_steps, args.gained_steps * 0.075 / 60, args.native_steps if "gained" in todo else 0,
        "+".join(n for n in JSCC_LINKS if n in todo) or "none", args.jscc_latent_steps,
        args.jscc_steps, args.jscc_minutes)


def _has_gained(learned_json: Path, domains: list[str], native_steps: int) -> bool:
    """Whether the set's learned weights already hold the variable-rate coder of every domain."""
    models = json.loads(learned_json.read_text()).get("models", {})
    return all(f"gained.{d}.q1" in models for d in domains) and (native_steps == 0 or "gained-native.identity.q1" in models)


def fit_image_codec_set(args: argparse.Namespace) -> Path:
    """Make (or finish) the image codec set of ``args.model_dir`` (module docstring); returns its folder."""
    from codec.train_coders import parse_pairs, rate_monotonic, train_learned_coders
    from codec.train_gained import SourceTransforms, save_transforms, train_set_coders

    model_dir: Path = args.model_dir.expanduser().resolve()
    out: Path = args.out or image_set_dir(model_dir)
    set_name = args.set_name or sanitize_set_name(model_dir.name)
    work: Path = args.work_dir or Path.home() / ".cache" / "meg" / "codecs" / f"{model_dir.name}-image-k0"
    pairs = parse_pairs(args.pairs)
    files = {"fcm": out / f"fcm_{set_name}.json", "dtufc": out / f"dtufcclip_{set_name}.safetensors",
             "learned": out / f"learned_{set_name}.json", "gained": out / f"learned_{set_name}.json",
             **{name: out / f"{name}.safetensors" for name in JSCC_LINKS}}
    gained_domains = [d for d in args.gained_domains.split(",") if d]
    skip = (set() if args.jscc else set(JSCC_LINKS))
    skip |= set() if gained_domains or args.native_steps else {"gained"}
    redo = set(args.redo.split(",")) - {""}
    todo = [part for part, path in files.items()
            if part not in skip and (args.force or part in redo or not path.is_file()
                                     or (part == "gained" and not _has_gained(path, gained_domains, args.native_steps)))]
    log_budget(args, pairs if "learned" in todo else [], todo)
    out.mkdir(parents=True, exist_ok=True)
    if not todo:
        logger.info("every part of %s is there already (pass --force to redo)", out)
        if not (out / CONFIG_FILE).is_file():
            refresh_image_set_config(out, model_dir, "config", {"method": "re-hashed"}, set_name=set_name)
        return out
    start = time.time()
    cache = work / LATENTS_FILE
    if args.force and cache.is_file():
        cache.unlink()
    latents = collect_latents(model_dir, args.latents + args.test_latents, cache, load_prompts(args.prompts),
                              args.sampling_steps, args.guidance_scale, args.seed, args.sample_batch, args.device)
    train, test = latents[:args.latents], latents[args.latents:]
    features = (f"sampler final latents of {model_dir.name} ({args.sampling_steps} steps, guidance "
                f"{args.guidance_scale:g}, seed {args.seed})")
    common = {"features": features, "latents": len(train), "test_latents": len(test),
              "command": f"{FIT_COMMAND.format(model_dir=model_dir)}"}
    if "fcm" in todo or "dtufc" in todo:
        tr = SourceTransforms.fit(train)
        save_transforms(out, set_name, tr, source=features, n_latents=len(train))
        refresh_image_set_config(out, model_dir, "fcm+dtufc", {
            **common, "method": "codec.train_gained.SourceTransforms.fit", "fcm_range": [tr.lo, tr.hi]},
            set_name=set_name)
    lo, hi = (lambda d: (float(d["lo"]), float(d["hi"])))(json.loads(files["fcm"].read_text()))
    if "learned" in todo:
        if not (out / CONFIG_FILE).is_file():  # the domains are computed through the codec stages, which read a set
            refresh_image_set_config(out, model_dir, "config", {"method": "re-hashed"}, set_name=set_name)
        meta = train_learned_coders(train, test, out, set_name, pairs, (lo, hi), args.coder_steps, args.coder_batch,
                                    args.jobs, {"source": features})
        monotonic = rate_monotonic(meta["models"])
        refresh_image_set_config(out, model_dir, "learned", {
            **common, "method": "codec.train_coders.train_learned_coders", "pairs": [":".join(p) for p in pairs],
            "steps_q1": args.coder_steps, "rate_monotonic": monotonic,
            "heldout_bpfp": {k: v["heldout_est_bpfp"] for k, v in meta["models"].items()}}, set_name=set_name)
    if "gained" in todo:
        stats = train_set_coders(train, test, out, set_name, gained_domains, args.gained_steps, args.jobs,
                                 {"source": features}, native_steps=args.native_steps)
        refresh_image_set_config(out, model_dir, "gained" if gained_domains else "gained-native", {
            **common, "method": "codec.train_gained.train_set_coders", "domains": gained_domains,
            "steps": args.gained_steps, "native_steps": args.native_steps, "rate_monotonic": rate_monotonic(stats),
            "heldout_bpfp": {k: v["heldout_est_bpfp"] for k, v in stats.items()}}, set_name=set_name)
    jscc = [name for name in JSCC_LINKS if name in todo]
    if jscc:
        train_jscc_links(model_dir, out, train, test, jscc, args.jscc_latent_steps, args.jscc_steps,
                         args.jscc_minutes, args.seed)
    logger.info("image codec set %s done in %.0f s", out, time.time() - start)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meg train codecs --source image", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=(IMAGE_SOURCE,), default=IMAGE_SOURCE)
    parser.add_argument("--model-dir", type=Path, required=True, help="a local diffusers folder (models/shapes_v1, SD 1.5 ...)")
    parser.add_argument("--out", type=Path, default=None, help="default: <model dir>/codecs/image-k0")
    parser.add_argument("--adopt", type=Path, default=None, metavar="OLD_DIR",
                        help="copy the files of an old codec/weights-layout folder into the set instead of fitting")
    parser.add_argument("--set-name", default=None, help="file stem of the set (default: the model folder's name)")
    parser.add_argument("--work-dir", type=Path, default=None, help="latent cache (default: ~/.cache/meg/codecs/...)")
    parser.add_argument("--latents", type=int, default=DEFAULT_LATENTS, help="training latents to sample")
    parser.add_argument("--test-latents", type=int, default=DEFAULT_TEST_LATENTS, help="held-out latents to sample")
    parser.add_argument("--prompts", type=Path, default=None, help="prompt file, one a line (default: shapes captions)")
    parser.add_argument("--sampling-steps", type=int, default=DEFAULT_SAMPLING_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="torch device for sampling")
    parser.add_argument("--pairs", default=DEFAULT_PAIRS, help="learned coders as kind:domain,...")
    parser.add_argument("--coder-steps", type=int, default=DEFAULT_CODER_STEPS, help="q1 steps; later qualities half")
    parser.add_argument("--coder-batch", type=int, default=8)
    parser.add_argument("--gained-domains", default=DEFAULT_GAINED_DOMAINS,
                        help="transforms to train the variable-rate coder behind ('' skips it)")
    parser.add_argument("--gained-steps", type=int, default=DEFAULT_GAINED_STEPS,
                        help="steps per variable-rate coder (a snapshot at half is what benchmarks compare)")
    parser.add_argument("--native-steps", type=int, default=DEFAULT_NATIVE_STEPS,
                        help="steps of the variable-rate coder on the latents' own channels (0 skips it)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel coder training processes")
    parser.add_argument("--no-jscc", dest="jscc", action="store_false", help="skip the JSCC links")
    parser.add_argument("--jscc-latent-steps", type=int, default=700)
    parser.add_argument("--jscc-steps", type=int, default=200, help="E2E pixel-loss steps")
    parser.add_argument("--jscc-minutes", type=float, default=8.0, help="time cap per JSCC link")
    parser.add_argument("--seed", type=int, default=FIT_SEED)
    parser.add_argument("--force", action="store_true", help="redo every part (default: skip finished ones)")
    parser.add_argument("--redo", default="", help="parts to redo although present, e.g. fcm,dtufc,gained")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns a process exit code."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.model_dir / "vae" / "config.json").is_file():
        parser.error(f"--model-dir {args.model_dir} is not a diffusers model folder (no vae/config.json)")
    if args.adopt is not None:
        try:
            out = adopt_image_set(args.adopt, args.model_dir,
                                  note=f"adopted with `{ADOPT_COMMAND.format(model_dir=args.model_dir, old_dir=args.adopt)}`")
        except ValueError as exc:
            parser.error(str(exc))
        sys.stdout.write(f"{out}\n")
        return 0
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    try:
        out = fit_image_codec_set(args)
    except ValueError as exc:
        parser.error(str(exc))
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training CLI for the shapes_v1 family: ``meg train <stage>`` / ``python -m models.train``.

Stages (each loads what it needs from --out and writes its component folder there):
``data`` (preview grid), ``classifier``, ``vae``, ``text`` (tokenizer + text encoder),
``unet`` (+ scheduler), ``decoder`` (tiny), ``robust-decoder``, ``evaluate`` and ``all``.
--out defaults to a new folder, runs/shapes_v1 (git-ignored); a model shipped under models/
is only written with --overwrite. Checkpoints go to --work-dir/<stage>/ckpt.pt every
--ckpt-every steps; --resume continues from there (model + optimizer + step). --finetune
(unet, classifier) starts from the component already in --out instead of a fresh one, so more
training can be added to a family without redoing the stages it depends on (checkpoints then
go to <stage>-finetune/).

Three more CLIs are dispatched from here: ``meg train llm <stage>`` (the embedded language model,
:mod:`models.llm.train`), ``meg train codecs --source llm-hidden --model-dir DIR --split-layer K`` (the fitted
hidden-state codec set of a split LLM, :mod:`codec.fit_hidden`) and ``meg train codecs --source image
--model-dir DIR [--adopt OLD_DIR]`` (the image codec set of a diffusion model, :mod:`codec.fit_image`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from models import DEFAULT_MODEL_DIR

# torch, diffusers and the stages load only once a stage runs: `meg train --help` must answer at once.
if TYPE_CHECKING:
    import torch

    from models.trainer import StageOptions

logger = logging.getLogger("models.train")

#: Where a training run writes by default: a new folder, never the shipped model (runs/ is git-ignored).
DEFAULT_OUT = Path("runs") / "shapes_v1"
#: Model families shipped with the project live here; writing into one needs --overwrite.
SHIPPED_MODELS_ROOT = DEFAULT_MODEL_DIR.parent

#: Per-stage defaults (steps, batch size, learning rate), sized for ~1 h on 2 CPU cores.
DEFAULTS: dict[str, tuple[int, int, float]] = {
    "data": (0, 0, 0.0),
    "classifier": (600, 64, 2e-3),
    "vae": (1500, 16, 1e-3),
    "text": (300, 64, 1e-3),
    "unet": (3000, 32, 1e-3),
    "decoder": (800, 32, 2e-3),
    "robust-decoder": (800, 32, 5e-4),
    "evaluate": (0, 0, 0.0),
}
SMOKE_STEPS = 3
SMOKE_BATCH = 4
SMOKE_POOL = 32
#: Stages whose component can be fine-tuned in place; the VAE and the text encoder are excluded
#: on purpose: the UNet, the tiny decoders and the learned codecs are all trained on their outputs.
FINETUNE_STAGES = ("unet", "classifier")
ORDER = ["data", "classifier", "vae", "text", "unet", "decoder", "robust-decoder", "evaluate"]
#: Component folders (models.components names) a stage loads from --out, so a missing one is named up
#: front with the stage that makes it, rather than as a loader's traceback minutes into a run.
REQUIRES: dict[str, tuple[str, ...]] = {
    "unet": ("vae", "tokenizer", "text_encoder"),
    "decoder": ("vae",),
    "robust-decoder": ("vae", "tiny_decoder"),
    "evaluate": ("vae", "tokenizer", "text_encoder", "unet", "scheduler", "classifier"),
}
MADE_BY = {"vae": "vae", "tokenizer": "text", "text_encoder": "text", "unet": "unet", "scheduler": "unet",
           "tiny_decoder": "decoder", "classifier": "classifier"}


def stage_runner(stage: str) -> Callable[[StageOptions], dict[str, float]]:
    """The function that runs ``stage`` (imports that stage's module, and with it torch)."""
    from models.stages import classifier, data, decoder, evaluate, text, unet, vae

    runners: dict[str, Callable[[StageOptions], dict[str, float]]] = {
        "data": data.run,
        "classifier": classifier.run,
        "vae": vae.run,
        "text": text.run,
        "unet": unet.run,
        "decoder": lambda o: decoder.run(o, robust=False),
        "robust-decoder": lambda o: decoder.run(o, robust=True),
        "evaluate": evaluate.run,
    }
    return runners[stage]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=[*ORDER, "all"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"model folder (default: {DEFAULT_OUT}, a new folder; models/* needs --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow writing into a model shipped under models/ (e.g. fine-tuning models/shapes_v1)")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: ~/.cache/meg/train/<out name>)")
    p.add_argument("--steps", type=int, default=None, help="override the stage's step count")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume from the stage checkpoint")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (seconds), for tests")
    p.add_argument(
        "--finetune",
        action="store_true",
        help=f"start from the component already in --out ({', '.join(FINETUNE_STAGES)} only)",
    )
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--pool-size", type=int, default=16384, help="rendered training images held in memory")
    p.add_argument("--num-workers", type=int, default=None, help="render workers (default: cores-1, max 8)")
    p.add_argument("--docs-dir", type=Path, default=None, help="write docs figures here (e.g. docs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    # Defaults live in models.stages.evaluate (importing it here would load torch for --help).
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="evaluate: classifier-free guidance (default: the evaluate stage's)")
    p.add_argument("--sampling-steps", type=int, default=None,
                   help="evaluate: DDIM steps (default: the evaluate stage's)")
    return p


def is_shipped(out: Path) -> bool:
    """Whether ``out`` is (inside) the folder of models shipped with the project."""
    resolved = out.expanduser().resolve()
    return resolved == SHIPPED_MODELS_ROOT or SHIPPED_MODELS_ROOT in resolved.parents


def missing_inputs(out: Path, stage: str, finetune: bool) -> list[str]:
    """Component folders ``stage`` loads from ``out`` that are not there (checked before anything runs)."""
    needed = list(REQUIRES.get(stage, ()))
    if finetune:
        needed.append(stage)
    return [name for name in needed if not (out / name).is_dir()]


def stage_options(args: argparse.Namespace, stage: str, device: torch.device) -> StageOptions:
    from models.trainer import StageOptions, default_workers

    steps, batch, lr = DEFAULTS[stage]
    if args.steps is not None:
        steps = args.steps
    if args.smoke:
        steps, batch = min(steps, SMOKE_STEPS), SMOKE_BATCH
    work = args.work_dir or Path.home() / ".cache" / "meg" / "train" / args.out.resolve().name
    extra: dict[str, object] = {"finetune": bool(args.finetune)}
    if args.guidance_scale is not None:
        extra["guidance_scale"] = args.guidance_scale
    if args.sampling_steps is not None:
        extra["sampling_steps"] = args.sampling_steps
    if args.docs_dir:
        extra["docs_dir"] = args.docs_dir
    return StageOptions(
        out=args.out,
        work_dir=work,
        steps=steps,
        batch_size=args.batch_size or batch,
        lr=args.lr or lr,
        device=device,
        seed=args.seed,
        resume=args.resume,
        smoke=args.smoke,
        ckpt_every=args.ckpt_every,
        pool_size=SMOKE_POOL if args.smoke else args.pool_size,
        num_workers=0 if args.smoke else (args.num_workers if args.num_workers is not None else default_workers()),
        extra=extra,
    )


def codecs_source(argv: list[str]) -> str | None:
    """The ``--source`` of a ``meg train codecs`` command line (``--source X`` or ``--source=X``), if any."""
    for i, arg in enumerate(argv):
        if arg == "--source" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--source="):
            return arg.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["llm"]:  # `meg train llm <stage>`: the language model's own CLI (models/llm/train.py)
        from models.llm.train import main as llm_main

        return llm_main(argv[1:])
    if argv[:1] == ["codecs"]:  # `meg train codecs --source image|llm-hidden ...`: fitted codec sets
        if codecs_source(argv[1:]) == "image":
            from codec.fit_image import main as image_codecs_main

            return image_codecs_main(argv[1:])
        from codec.fit_hidden import main as codecs_main

        return codecs_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.finetune and args.stage not in FINETUNE_STAGES:
        parser.error(f"--finetune applies to {', '.join(FINETUNE_STAGES)} only, not {args.stage!r}")
    if is_shipped(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} is a model shipped with the project; training would overwrite it. "
                     f"Train into a new folder (the default is {DEFAULT_OUT}) or add --overwrite.")
    stages = ORDER if args.stage == "all" else [args.stage]
    if args.stage != "all":
        missing = missing_inputs(args.out, args.stage, args.finetune)
        if missing:
            makers = sorted({MADE_BY.get(m, m) for m in missing if m != args.stage}, key=ORDER.index)
            hint = (" then ".join(f"`meg train {m} --out {args.out}`" for m in makers) + " first, or `meg train all`"
                    if makers else "train it first without --finetune")
            parser.error(f"stage {args.stage!r} needs {', '.join(missing)} in {args.out}: {hint}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import torch

    from models import components as C
    from models.trainer import append_training_log, pick_device, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    logger.info("training %s into %s", args.stage, args.out)
    report: dict[str, dict[str, float]] = {}
    for stage in stages:
        seed_everything(args.seed)
        opts = stage_options(args, stage, device)
        logger.info("stage %s on %s: steps=%d batch=%d lr=%g", stage, device, opts.steps, opts.batch_size, opts.lr)
        t0 = time.time()
        # A fine-tune is logged beside the from-scratch run it continues, not over it.
        key = f"{stage}-finetune" if args.finetune else stage
        report[key] = stage_runner(stage)(opts)
        report[key]["wall_seconds"] = time.time() - t0
        C.write_model_index(args.out)
    append_training_log(args.out, report, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

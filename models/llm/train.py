"""Training CLI of the embedded LLM: ``meg train llm <stage>`` = ``python -m models.llm.train <stage>``.

Stages: ``data`` (preview), ``tokenizer``, ``train``, ``evaluate`` and ``all``. Checkpoints go to
``--work-dir/llm/ckpt.pt`` every ``--ckpt-every`` steps; ``--resume`` continues from there (model,
optimizer, step; the data of step i is a function of (seed, i), so a resumed run sees the same batches).
The default output is a NEW folder (``runs/shapes_llm``, git-ignored); writing into the committed
``models/shapes_llm_v1``, or over a tokenizer/model already in ``--out``, needs ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models.llm import DEFAULT_LLM_DIR
from models.llm import stages
from models.llm.model import LlmModelConfig
from models.trainer import StageOptions, append_training_log, pick_device, seed_everything

logger = logging.getLogger("models.llm.train")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "runs" / "shapes_llm"
ORDER = ["data", "tokenizer", "train", "evaluate"]
#: steps, batch size, learning rate of each stage.
DEFAULTS: dict[str, tuple[int, int, float]] = {
    "data": (0, 0, 0.0),
    "tokenizer": (0, 0, 0.0),
    "train": (4000, 64, 2e-3),
    "evaluate": (0, 0, 0.0),
}
#: Measured seconds per training step of the default model and batch, one torch thread on the project's
#: shared 2-core CPU machine with other jobs running (prototype 0.64, committed run 0.587: 4,000 steps in
#: 42.6 and 39.2 min); used to print the time budget before training.
SECONDS_PER_STEP = 0.62
#: Files a stage writes into --out, which it refuses to replace without --overwrite.
WRITES: dict[str, tuple[str, ...]] = {"tokenizer": ("tokenizer.json",), "train": ("model.safetensors",)}
SMOKE_STEPS = 3
SMOKE_BATCH = 4

STAGES: dict[str, Callable[[StageOptions], dict[str, float]]] = {
    "data": stages.run_data,
    "tokenizer": stages.run_tokenizer,
    "train": stages.run_train,
    "evaluate": stages.run_evaluate,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meg train llm", description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=[*ORDER, "all"])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder (default: {DEFAULT_OUT})")
    p.add_argument("--overwrite", action="store_true", help="allow replacing an existing model/tokenizer, or "
                   "writing into the committed models/shapes_llm_v1")
    p.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: ~/.cache/meg/train/<out name>)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--answer-weight", type=float, default=stages.ANSWER_WEIGHT)
    p.add_argument("--curriculum-steps", type=int, default=stages.CURRICULUM_STEPS,
                   help="train: first steps on one-object scenes only")
    p.add_argument("--eval-every", type=int, default=250, help="train: held-out probe every N steps")
    p.add_argument("--layers", type=int, default=LlmModelConfig.num_hidden_layers)
    p.add_argument("--hidden", type=int, default=LlmModelConfig.hidden_size)
    p.add_argument("--intermediate", type=int, default=LlmModelConfig.intermediate_size)
    p.add_argument("--heads", type=int, default=LlmModelConfig.num_attention_heads)
    p.add_argument("--device", default="cpu", help="auto|cpu|cuda|mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume training from the stage checkpoint")
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (seconds), for tests")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    return p


def refuse_overwrite(args: argparse.Namespace, stages_to_run: list[str]) -> str | None:
    """Why this run would overwrite something it must not (None when it may go ahead)."""
    if args.overwrite:
        return None
    if args.out.resolve() == DEFAULT_LLM_DIR.resolve() and any(s != "data" for s in stages_to_run):
        return f"{args.out} is the committed embedded model; pass --overwrite to write into it"
    for stage in stages_to_run:
        for name in WRITES.get(stage, ()):
            if (args.out / name).exists():
                return f"{args.out / name} exists; pass --overwrite to replace it, or choose another --out"
    return None


def stage_options(args: argparse.Namespace, stage: str, device: torch.device) -> StageOptions:
    steps, batch, lr = DEFAULTS[stage]
    steps = args.steps if args.steps is not None and stage == "train" else steps
    if args.smoke:
        steps, batch = min(steps, SMOKE_STEPS), SMOKE_BATCH
    cfg = LlmModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads)
    return StageOptions(
        out=args.out,
        work_dir=args.work_dir or Path.home() / ".cache" / "meg" / "train" / args.out.resolve().name,
        steps=steps,
        batch_size=args.batch_size or batch,
        lr=args.lr or lr,
        device=device,
        seed=args.seed,
        resume=args.resume,
        smoke=args.smoke,
        ckpt_every=args.ckpt_every,
        extra={"model_config": cfg, "answer_weight": args.answer_weight, "eval_every": args.eval_every,
               "curriculum_steps": args.curriculum_steps},
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns a process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    to_run = ORDER if args.stage == "all" else [args.stage]
    if (reason := refuse_overwrite(args, to_run)) is not None:
        parser.error(reason)
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, float]] = {}
    for stage in to_run:
        seed_everything(args.seed)
        opts = stage_options(args, stage, device)
        if stage == "train":
            logger.info("time budget: %d steps x ~%.2f s/step (1 thread, shared 2-core CPU) = ~%.0f min",
                        opts.steps, SECONDS_PER_STEP, opts.steps * SECONDS_PER_STEP / 60)
        logger.info("stage %s on %s: steps=%d batch=%d lr=%g -> %s", stage, device, opts.steps, opts.batch_size,
                    opts.lr, args.out)
        t0 = time.time()
        report[stage] = {**STAGES[stage](opts), "wall_seconds": time.time() - t0}
    append_training_log(args.out, report, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared training plumbing: options, device choice, data pools, checkpoints and the step loop.

Why: every stage (vae, text, unet, ...) needs the same resumable loop with a progress bar and
periodic checkpoints; keeping it here keeps the stage modules about the model, not the loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from models import shapes

logger = logging.getLogger(__name__)


@dataclass
class StageOptions:
    """Options shared by all training stages (filled from the CLI)."""

    out: Path
    work_dir: Path
    steps: int
    batch_size: int
    lr: float
    device: torch.device
    seed: int = 0
    resume: bool = False
    smoke: bool = False
    ckpt_every: int = 500
    pool_size: int = 16384
    num_workers: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    def stage_dir(self, stage: str) -> Path:
        """Per-stage checkpoint folder inside the work dir."""
        path = self.work_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path


def pick_device(name: str | None) -> torch.device:
    """``cuda`` if available (or requested), else ``mps``, else ``cpu``."""
    if name and name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python/numpy/torch and return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class _UInt8Shapes(Dataset):
    """Training seeds rendered as uint8 CHW tensors plus labels (for fast pooled loading)."""

    def __init__(self, seeds: range) -> None:
        self.seeds = seeds

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = shapes.sample(self.seeds[i])
        img = torch.from_numpy(s.image).permute(2, 0, 1).contiguous()
        labels = torch.tensor(shapes.labels_to_indices(s.color, s.shape, s.background))
        combo = shapes.COMBINATIONS.index((s.color, s.shape, s.background))
        return img, labels, combo


@dataclass
class DataPool:
    """A fixed pool of rendered training samples kept in memory as uint8.

    Rendering is cheap but not free in Python; a pool of ~16k images (200 MB would be far
    more than needed) is re-used for many epochs with random flips, which is plenty of
    variety for this data set and keeps GPU/CPU steps from waiting on the renderer.
    """

    images: torch.Tensor  # (N, 3, 64, 64) uint8
    labels: torch.Tensor  # (N, 3) long: shape, color, background
    combos: torch.Tensor  # (N,) long index into shapes.COMBINATIONS

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch(
        self, idx: torch.Tensor, device: torch.device, flip: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] on ``device`` (random horizontal flips keep labels valid)."""
        x = self.images[idx].to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if flip:
            mask = torch.rand(x.shape[0], device=device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x, self.labels[idx].to(device), self.combos[idx].to(device)


def build_pool(size: int, num_workers: int = 0, seed_offset: int = 0) -> DataPool:
    """Render training seeds ``seed_offset .. seed_offset+size-1`` into a :class:`DataPool`."""
    t0 = time.time()
    loader = DataLoader(
        _UInt8Shapes(range(seed_offset, seed_offset + size)),
        batch_size=256,
        num_workers=num_workers,
        shuffle=False,
    )
    imgs, labels, combos = [], [], []
    for a, b, c in tqdm(loader, desc="render pool", leave=False):
        imgs.append(a)
        labels.append(b)
        combos.append(c)
    pool = DataPool(torch.cat(imgs), torch.cat(labels), torch.cat(combos))
    logger.info("rendered %d training images in %.1fs", size, time.time() - t0)
    return pool


def default_workers() -> int:
    """Render workers: all but one core, capped (the renderer is light)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class Checkpointer:
    """Saves/loads ``{step, modules, optimizer, extra}`` as ``ckpt.pt`` in a stage work dir."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ckpt.pt"

    def save(
        self,
        step: int,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        extra: dict[str, object] | None = None,
    ) -> None:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "extra": extra or {},
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(
        self,
        modules: dict[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> tuple[int, dict[str, object]]:
        """Restore state if a checkpoint exists; returns ``(step, extra)`` (0 if none)."""
        if not self.path.exists():
            logger.info("no checkpoint at %s, starting from scratch", self.path)
            return 0, {}
        state = torch.load(self.path, map_location=device, weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        optimizer.load_state_dict(state["optimizer"])
        logger.info("resumed from %s at step %d", self.path, state["step"])
        return int(state["step"]), dict(state.get("extra", {}))


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 5% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def run_loop(
    name: str,
    opts: StageOptions,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    step_fn: Callable[[int], dict[str, float]],
    warmup: int = 100,
) -> dict[str, float]:
    """Run ``step_fn(step)`` from the (resumed) step to ``opts.steps`` with LR schedule,
    tqdm progress and periodic checkpoints. Returns the stats of the last step plus timing."""
    ckpt = Checkpointer(opts.stage_dir(name))
    start = 0
    if opts.resume:
        start, _ = ckpt.load(modules, optimizer, opts.device)
    stats: dict[str, float] = {}
    t0 = time.time()
    bar = tqdm(range(start, opts.steps), desc=name, initial=start, total=opts.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, opts.steps, opts.lr, warmup=min(warmup, opts.steps // 5))
        stats = step_fn(step)
        if step % 25 == 0 or step == opts.steps - 1:
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items()})
        if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < opts.steps:
            ckpt.save(step + 1, modules, optimizer)
    elapsed = time.time() - t0
    done = max(1, opts.steps - start)
    stats = dict(stats)
    stats.update(
        {"train_seconds": elapsed, "seconds_per_step": elapsed / done, "steps": float(opts.steps)}
    )
    ckpt.save(opts.steps, modules, optimizer)
    logger.info("%s: %d steps in %.1fs (%.3fs/step) %s", name, done, elapsed, elapsed / done, stats)
    return stats


def random_indices(n: int, batch: int, device: torch.device | None = None) -> torch.Tensor:
    """Uniform random batch indices into a pool of size ``n``."""
    return torch.randint(0, n, (batch,), device=device)


def chunks(seq: list, size: int) -> Iterable[list]:
    """Split a list into consecutive chunks of at most ``size`` items."""
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def append_training_log(out: Path, report: dict[str, dict], device: object) -> None:
    """Merge this run's per-stage ``report`` into ``out/training_log.json`` (earlier stages' entries stay)."""
    log_path = Path(out) / "training_log.json"
    previous = json.loads(log_path.read_text()) if log_path.exists() else {}
    previous.update({k: {**v, "device": str(device)} for k, v in report.items()})
    log_path.write_text(json.dumps(previous, indent=2, default=float) + "\n", encoding="utf-8")

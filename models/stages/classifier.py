"""``meg train classifier``: the semantic judge (shape/colour/background) and FD feature net."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models import components as C
from models.classifier import ShapesClassifier
from models.shapes import HELDOUT_SEED_BASE, render_batch
from models.trainer import StageOptions, build_pool, random_indices, run_loop

logger = logging.getLogger(__name__)


def degrade(x: torch.Tensor) -> torch.Tensor:
    """Random blur + noise + brightness jitter so the judge also works on decoded/generated
    images, which are slightly soft and noisy compared with clean renderings."""
    b = x.shape[0]
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    w = torch.rand(b, 1, 1, 1, device=x.device)
    x = w * blurred + (1 - w) * x
    x = x + torch.randn_like(x) * torch.rand(b, 1, 1, 1, device=x.device) * 0.08
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, device=x.device) - 0.5))
    return x.clamp(-1, 1)


@torch.no_grad()
def accuracy_on_heldout(model: ShapesClassifier, n: int, device: torch.device) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` held-out-seed renderings."""
    x, y, _ = render_batch(range(HELDOUT_SEED_BASE, HELDOUT_SEED_BASE + n))
    model.eval()
    s, c, b = model(x.to(device))
    y = y.to(device)
    return {
        "shape_acc": (s.argmax(1) == y[:, 0]).float().mean().item(),
        "color_acc": (c.argmax(1) == y[:, 1]).float().mean().item(),
        "background_acc": (b.argmax(1) == y[:, 2]).float().mean().item(),
    }


def run(opts: StageOptions) -> dict[str, float]:
    pool = build_pool(opts.pool_size, opts.num_workers)
    finetune = bool(opts.extra.get("finetune"))
    start = ShapesClassifier.from_pretrained(opts.out / C.CLASSIFIER) if finetune else ShapesClassifier()
    model = start.to(opts.device).train()
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=1e-4)

    def step(_: int) -> dict[str, float]:
        x, y, _c = pool.batch(random_indices(len(pool), opts.batch_size), opts.device)
        s, c, b = model(degrade(x))
        loss = F.cross_entropy(s, y[:, 0]) + F.cross_entropy(c, y[:, 1]) + F.cross_entropy(b, y[:, 2])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return {"loss": loss.item()}

    stats = run_loop("classifier-finetune" if finetune else "classifier", opts, {"model": model}, optim, step)
    stats.update(accuracy_on_heldout(model, 64 if opts.smoke else 512, opts.device))
    model.cpu().save_pretrained(opts.out / C.CLASSIFIER)
    stats["parameters"] = float(C.count_parameters(model))
    logger.info("classifier: %s", stats)
    return stats

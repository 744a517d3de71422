"""``meg train data``: render a preview grid of the procedural data set (sanity check only)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from models import shapes
from models.trainer import StageOptions

logger = logging.getLogger(__name__)


def preview_grid(seeds: list[int], columns: int = 8) -> Image.Image:
    """Tile ``sample(seed)`` images into one PIL image."""
    imgs = [shapes.sample(s).image for s in seeds]
    rows = -(-len(imgs) // columns)
    blank = np.zeros_like(imgs[0])
    imgs += [blank] * (rows * columns - len(imgs))
    grid = np.concatenate(
        [np.concatenate(imgs[r * columns : (r + 1) * columns], axis=1) for r in range(rows)]
    )
    return Image.fromarray(grid)


def run(opts: StageOptions) -> dict[str, float]:
    """Write ``data_preview.png`` and ``data_preview.txt`` (captions) into the work dir, and
    ``docs/models_data_preview.png`` when ``extra['docs_dir']`` is set."""
    n = 16 if opts.smoke else 64
    seeds = list(range(opts.seed, opts.seed + n))
    grid = preview_grid(seeds)
    out_dir = opts.stage_dir("data")
    grid.save(out_dir / "data_preview.png")
    captions = [f"{s}\t{shapes.sample(s).caption}" for s in seeds]
    (out_dir / "data_preview.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    docs = opts.extra.get("docs_dir")
    if docs:
        Path(str(docs)).mkdir(parents=True, exist_ok=True)
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(
            Path(str(docs)) / "models_data_preview.png"
        )
    logger.info("wrote data preview of %d samples to %s", n, out_dir)
    return {"preview_samples": float(n)}

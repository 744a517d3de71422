"""Shared helper: encode a rendered pool with the trained VAE (done once per stage)."""

from __future__ import annotations

import logging
import time

import torch
from diffusers import AutoencoderKL

from models.trainer import DataPool

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_pool(
    vae: AutoencoderKL, pool: DataPool, device: torch.device, batch: int = 256, flip: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior ``(mean, std)`` of the VAE for every pool image (optionally mirrored), on
    ``device``. Unscaled, i.e. in the VAE decoder's input space."""
    t0 = time.time()
    means, stds = [], []
    for start in range(0, len(pool), batch):
        idx = torch.arange(start, min(start + batch, len(pool)))
        x, _y, _c = pool.batch(idx, device, flip=False)
        if flip:
            x = x.flip(-1)
        dist = vae.encode(x).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    logger.info("encoded %d pool images in %.1fs", len(pool), time.time() - t0)
    return torch.cat(means), torch.cat(stds)

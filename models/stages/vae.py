"""``meg train vae``: AutoencoderKL 64x64x3 <-> 4x16x16, then set ``scaling_factor``."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models import components as C
from models.trainer import StageOptions, build_pool, random_indices, run_loop

logger = logging.getLogger(__name__)

#: KL weight (per image, KL summed over latent elements). Small, as in SD, but large enough to
#: keep unscaled latents O(1) so AutoencoderTiny's tanh(x/3)*3 input clamp is harmless.
KL_WEIGHT = 1e-6


@torch.no_grad()
def latent_std(vae: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> float:
    """Std of sampled latents, as SD computes its ``scaling_factor = 1/std``."""
    zs = [vae.encode(x).latent_dist.sample() for x in images.split(batch)]
    return torch.cat(zs).float().std().item()


def run(opts: StageOptions) -> dict[str, float]:
    pool = build_pool(opts.pool_size, opts.num_workers)
    vae = C.new_vae().to(opts.device).train()
    optim = torch.optim.AdamW(vae.parameters(), lr=opts.lr, weight_decay=0.0)

    def step(_: int) -> dict[str, float]:
        x, _y, _c = pool.batch(random_indices(len(pool), opts.batch_size), opts.device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) + KL_WEIGHT * post.kl().mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optim.step()
        psnr = 10 * torch.log10(4.0 / mse.detach()).item()  # range [-1, 1] -> peak^2 = 4
        return {"loss": loss.item(), "psnr": psnr}

    stats = run_loop("vae", opts, {"vae": vae}, optim, step)
    vae.eval()
    n = min(len(pool), 2048)
    x, _y, _c = pool.batch(torch.arange(n), opts.device, flip=False)
    std = latent_std(vae, x)
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.cpu().save_pretrained(opts.out / C.VAE)
    stats.update({"latent_std": std, "scaling_factor": 1.0 / std, "parameters": float(C.count_parameters(vae))})
    logger.info("vae: %s", stats)
    return stats

"""``meg train decoder`` / ``robust-decoder``: AutoencoderTiny distilled from the VAE decoder.

``decoder``: input = unscaled VAE latents (posterior mean), target = VAE decode of the same
latents (pixel MSE). The tiny encoder is distilled alongside (image -> VAE latent mean) so the
saved AutoencoderTiny is complete, though the device only needs the decoder.
``robust-decoder``: starts from tiny_decoder/ and fine-tunes its decoder on latents that
crossed the channel of :mod:`models.channel` (AWGN or Rayleigh, SNR uniform in
[-5, 20] dB); the target stays the clean VAE decode, so it learns to denoise.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from models import components as C
from models.channel import apply_channel
from models.stages.latents import encode_pool
from models.trainer import StageOptions, build_pool, random_indices, run_loop

logger = logging.getLogger(__name__)

SNR_RANGE_DB = (-5.0, 20.0)


def _psnr01(mse: torch.Tensor) -> float:
    """PSNR for images in [-1, 1] (peak-to-peak 2)."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10)).item()


def run(opts: StageOptions, robust: bool = False) -> dict[str, float]:
    name = C.ROBUST_DECODER if robust else C.TINY_DECODER
    vae = C.load_vae(opts.out).to(opts.device).requires_grad_(False)
    pool = build_pool(opts.pool_size, opts.num_workers)
    means, _ = encode_pool(vae, pool, opts.device)
    if robust:
        tiny = C.load_tiny(opts.out, C.TINY_DECODER)
        tiny.encoder.requires_grad_(False)
        params = list(tiny.decoder.parameters())
    else:
        tiny = C.new_tiny_decoder(float(vae.config.scaling_factor))
        params = list(tiny.parameters())
    tiny.to(opts.device).train()
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.0)
    lo, hi = SNR_RANGE_DB

    def step(_: int) -> dict[str, float]:
        idx = random_indices(means.shape[0], opts.batch_size, opts.device)
        z = means[idx]
        with torch.no_grad():
            target = vae.decode(z).sample.clamp(-1, 1)
        stats: dict[str, float] = {}
        if robust:
            b = z.shape[0]
            snr = lo + (hi - lo) * torch.rand(b, device=opts.device)
            half = b // 2
            z_in = torch.cat(
                [apply_channel(z[:half], snr[:half], "awgn"), apply_channel(z[half:], snr[half:], "rayleigh")]
            )
            loss = F.mse_loss(tiny.decoder(z_in), target)
        else:
            x, _y, _c = pool.batch(idx.cpu(), opts.device, flip=False)
            dec = F.mse_loss(tiny.decoder(z), target)
            enc = F.mse_loss(tiny.encoder(x), z)
            loss = dec + 0.1 * enc
            stats["enc_mse"] = enc.item()
            loss_for_psnr = dec
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        stats["loss"] = loss.item()
        stats["psnr"] = _psnr01(loss.detach() if robust else loss_for_psnr.detach())
        return stats

    stats = run_loop(name, opts, {"tiny": tiny}, optim, step)
    tiny.cpu().eval().save_pretrained(opts.out / name)
    stats["parameters"] = float(C.count_parameters(tiny.decoder))
    logger.info("%s: %s", name, stats)
    return stats

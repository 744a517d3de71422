"""One decode function for every decoder the device may use.

Convention (the reason this module exists): all decoders of the family take the SAME tensor,
the *unscaled* VAE latents, i.e. ``vae.encode(x).latent_dist.mean`` or diffusion output
already divided by ``vae.config.scaling_factor``. ``AutoencoderTiny``'s own
``latent_magnitude``/``latent_shift`` (``scale_latents``/``unscale_latents``) are only for its
uint8 storage format and are NOT applied here; the tiny decoders were distilled on unscaled
VAE latents directly (``tiny.decoder(latents)`` soft-clamps inputs to about ±3 with tanh, which
the VAE latents stay well within). Decoders can therefore be swapped freely on the device.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, AutoencoderTiny


@torch.no_grad()
def decode_latents(
    decoder_model: AutoencoderKL | AutoencoderTiny, latents: torch.Tensor
) -> torch.Tensor:
    """Decode unscaled VAE latents (B, 4, 16, 16) to images (B, 3, 64, 64) in [0, 1]."""
    if not isinstance(decoder_model, (AutoencoderKL, AutoencoderTiny)):
        raise TypeError(f"unsupported decoder {type(decoder_model).__name__}")
    param = next(decoder_model.parameters())
    images = decoder_model.decode(latents.to(param.device, param.dtype)).sample
    return images.float().add(1.0).div(2.0).clamp(0.0, 1.0)

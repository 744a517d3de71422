"""Reference text-to-latent sampler (classifier-free guidance with the committed scheduler).

Why: the evaluation, the tests and other services need one agreed definition of "generate":
initial noise is ``torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(seed))``
drawn on CPU per prompt, multiplied by ``scheduler.init_noise_sigma``; the empty caption ``""``
is the unconditional prompt; the final latents are divided by ``vae.config.scaling_factor`` so
callers receive *unscaled* VAE latents, ready for any decoder in :mod:`models.decoders`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import SchedulerMixin, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]
) -> torch.Tensor:
    """Text-encoder hidden states (B, max_len, hidden) for a list of prompts."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = next(text_encoder.parameters()).device
    return text_encoder(ids.to(device)).last_hidden_state


def initial_noise(seeds: list[int], shape: tuple[int, int, int] = (4, 16, 16)) -> torch.Tensor:
    """Per-seed CPU noise, stacked to (B, *shape)."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def _scaling_factor_from_unet(unet: UNet2DConditionModel) -> float:
    """Find ``vae/config.json`` next to the folder the UNet was loaded from."""
    src = Path(str(getattr(unet.config, "_name_or_path", "")))
    cfg = src.parent / "vae" / "config.json"
    if not cfg.is_file():
        raise ValueError("pass scaling_factor=vae.config.scaling_factor (UNet origin unknown)")
    return float(json.loads(cfg.read_text(encoding="utf-8"))["scaling_factor"])


@torch.no_grad()
def generate_latents(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 4.0,
    *,
    scaling_factor: float | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Generate unscaled VAE latents (B, 4, 16, 16) on CPU for ``prompts`` with ``seeds``.

    ``scaling_factor`` defaults to the ``vae/config.json`` beside the UNet's folder (works for
    models loaded with ``from_pretrained``); pass ``vae.config.scaling_factor`` otherwise.
    The scheduler's timesteps are reset here, so one scheduler object can be reused.
    """
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    sf = scaling_factor if scaling_factor is not None else _scaling_factor_from_unet(unet)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    uncond = encode_prompts(tokenizer, text_encoder, [""]).to(device, dtype)
    out = []
    for start in range(0, len(prompts), batch_size):
        p = prompts[start : start + batch_size]
        s = seeds[start : start + batch_size]
        cond = encode_prompts(tokenizer, text_encoder, p).to(device, dtype)
        context = torch.cat([uncond.expand(len(p), -1, -1), cond])
        scheduler.set_timesteps(steps, device=device)
        latents = initial_noise(s, shape).to(device, dtype) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            pred = unet(model_in, t, encoder_hidden_states=context).sample
            pred_uncond, pred_cond = pred.chunk(2)
            guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        out.append((latents / sf).float().cpu())
    return torch.cat(out)

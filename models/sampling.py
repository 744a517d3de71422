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

from models.denoising import denoise, start_row, unet_predictor


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
    ``scheduler`` is a template: every prompt gets its own copy (:mod:`models.denoising` keeps one
    scheduler per row), so the object passed in is left as it was and can be reused.
    """
    if len(prompts) != len(seeds):
        raise ValueError("need one seed per prompt")
    sf = scaling_factor if scaling_factor is not None else _scaling_factor_from_unet(unet)
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    uncond = {"encoder_hidden_states": encode_prompts(tokenizer, text_encoder, [""]).to(device, dtype)}
    predict = unet_predictor(unet)
    out = []
    for start in range(0, len(prompts), batch_size):
        p = prompts[start : start + batch_size]
        s = seeds[start : start + batch_size]
        cond = encode_prompts(tokenizer, text_encoder, p).to(device, dtype)
        noise = initial_noise(s, shape).to(device, dtype)
        rows = [start_row(type(scheduler).from_config(scheduler.config), steps, noise[i : i + 1],
                          {"encoder_hidden_states": cond[i : i + 1]}, uncond, guidance_scale, seed=seed)
                for i, seed in enumerate(s)]
        denoise(predict, rows)
        out.append((torch.cat([r.latents for r in rows]) / sf).float().cpu())
    return torch.cat(out)

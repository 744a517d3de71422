"""The classifier-free-guided denoising loop, shared by the edge (steps 1..k) and a split-point device
(steps k+1..N). Both sides must run exactly the same arithmetic for a split to be seamless, so it lives in
one place outside either service.

Batching: one call denoises several requests at once. Each row keeps its own initial noise (seeded per
request) and its own guidance scale; rows must share the step count and latent shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class DenoiseRows:
    """Per-row state of a batched denoising run."""

    latents: torch.Tensor          # (B, C, H, W), scheduler space
    cond: torch.Tensor             # (B, L, D) text embeddings
    uncond: torch.Tensor           # (B, L, D) empty-prompt embeddings
    guidance: torch.Tensor         # (B,) guidance scales


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-request Gaussian noise drawn on the CPU from ``seed``, so a seed means the same image whatever
    the batch it lands in and whatever the accelerator."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def run_steps(unet: torch.nn.Module, scheduler: object, rows: DenoiseRows, timesteps: Sequence[torch.Tensor],
              keep: Callable[[], Sequence[bool]] | None = None,
              on_drop: Callable[[Sequence[bool]], None] | None = None) -> DenoiseRows:
    """Run ``timesteps`` of the scheduler on every row.

    ``keep`` is polled before each step; rows it marks False (cancelled requests) leave the batch without
    disturbing the others, and ``on_drop`` is told which rows left.
    """
    for t in timesteps:
        if keep is not None:
            mask = list(keep())
            if not all(mask):
                idx = torch.tensor([i for i, k in enumerate(mask) if k], dtype=torch.long)
                rows = DenoiseRows(rows.latents[idx], rows.cond[idx], rows.uncond[idx], rows.guidance[idx])
                _slice_scheduler_state(scheduler, idx)
                if on_drop is not None:
                    on_drop(mask)
                if rows.latents.shape[0] == 0:
                    return rows
        b = rows.latents.shape[0]
        model_in = torch.cat([rows.latents, rows.latents])
        model_in = scheduler.scale_model_input(model_in, t)
        embeds = torch.cat([rows.uncond, rows.cond])
        with torch.inference_mode():
            noise = unet(model_in, t, encoder_hidden_states=embeds).sample
        noise_uncond, noise_cond = noise[:b], noise[b:]
        g = rows.guidance.to(noise.dtype).view(-1, *([1] * (noise.dim() - 1)))
        guided = noise_uncond + g * (noise_cond - noise_uncond)
        latents = scheduler.step(guided, t, rows.latents).prev_sample
        rows = DenoiseRows(latents, rows.cond, rows.uncond, rows.guidance)
    return rows


def _slice_scheduler_state(scheduler: object, idx: torch.Tensor) -> None:
    """Multistep schedulers keep per-row history; keep it aligned with the surviving rows."""
    history = getattr(scheduler, "model_outputs", None)
    if isinstance(history, list):
        scheduler.model_outputs = [h[idx] if isinstance(h, torch.Tensor) and h.dim() > 0 else h for h in history]

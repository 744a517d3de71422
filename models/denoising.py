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


Conditioning = dict[str, torch.Tensor]
#: (model input (2B, ...), timestep, conditioning of the 2B rows: uncond first, then cond) -> prediction (2B, ...)
Predictor = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class DenoiseRows:
    """Per-row state of a batched denoising run. Conditioning tensors are batch-first, one row a request."""

    latents: torch.Tensor          # (B, C, H, W), scheduler space
    cond: Conditioning             # e.g. {"encoder_hidden_states": (B, L, D)}, plus pooled embeddings ...
    uncond: Conditioning           # the same keys for the empty prompt
    guidance: torch.Tensor         # (B,) guidance scales

    def select(self, idx: torch.Tensor) -> "DenoiseRows":
        return DenoiseRows(self.latents[idx], {k: v[idx] for k, v in self.cond.items()},
                           {k: v[idx] for k, v in self.uncond.items()}, self.guidance[idx])


def unet_predictor(unet: torch.nn.Module) -> Predictor:
    """UNet2DConditionModel (SD 1.x and the embedded family); extra keys go to ``added_cond_kwargs`` (SDXL)."""

    def predict(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        return unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                    added_cond_kwargs=added or None).sample
    return predict


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-request Gaussian noise drawn on the CPU from ``seed``, so a seed means the same image whatever
    the batch it lands in and whatever the accelerator."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def run_steps(predict: Predictor, scheduler: object, rows: DenoiseRows, timesteps: Sequence[torch.Tensor],
              keep: Callable[[], Sequence[bool]] | None = None,
              on_drop: Callable[[Sequence[bool]], None] | None = None) -> DenoiseRows:
    """Run ``timesteps`` of the scheduler on every row with classifier-free guidance.

    ``keep`` is polled before each step; rows it marks False (cancelled requests) leave the batch without
    disturbing the others, and ``on_drop`` is told which rows left.
    """
    scale = getattr(scheduler, "scale_model_input", None)
    for t in timesteps:
        if keep is not None:
            mask = list(keep())
            if not all(mask):
                idx = torch.tensor([i for i, k in enumerate(mask) if k], dtype=torch.long)
                rows = rows.select(idx)
                _slice_scheduler_state(scheduler, idx)
                if on_drop is not None:
                    on_drop(mask)
                if rows.latents.shape[0] == 0:
                    return rows
        b = rows.latents.shape[0]
        model_in = torch.cat([rows.latents, rows.latents])
        if scale is not None:
            model_in = scale(model_in, t)
        both = {k: torch.cat([rows.uncond[k], rows.cond[k]]) for k in rows.cond}
        with torch.inference_mode():
            noise = predict(model_in, t.expand(2 * b) if t.dim() == 0 else t, both)
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

"""The one classifier-free-guided denoising loop: the edge's step scheduler, the split-point device finisher,
the reference sampler (:func:`models.sampling.generate_latents`) and the benchmarks all advance latents with
:func:`denoise_step`. Both sides of a split must run exactly the same arithmetic for the split to be seamless,
so it lives in one place outside either service.

Every request is a :class:`DenoiseRow` with its *own* scheduler object and its own slice of timesteps. That is
what lets rows at different steps, with different step counts or split points, share one batched model call
(the denoiser takes a (B,) timestep tensor), and lets rows join and leave a running batch at any step
boundary: nothing in a row depends on which other rows share its batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


Conditioning = dict[str, torch.Tensor]
#: (model input (2B, ...), timesteps (2B,), conditioning of the 2B rows: uncond first, then cond) -> prediction
Predictor = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class DenoiseRow:
    """One request's denoising state. Tensors are batch-first with one row: latents (1, C, H, W) in scheduler
    space, conditioning such as ``{"encoder_hidden_states": (1, L, D)}`` plus pooled embeddings."""

    latents: torch.Tensor
    cond: Conditioning
    uncond: Conditioning           # the same keys for the empty prompt
    guidance: float
    scheduler: Any                 # a diffusers scheduler owned by this row alone
    timesteps: torch.Tensor        # the timesteps this row runs, in order (a slice of scheduler.timesteps)
    generator: torch.Generator | None = None   # for stochastic schedulers (ancestral, SDE)
    done_steps: int = 0
    _step_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def finished(self) -> bool:
        return self.done_steps >= len(self.timesteps)

    @property
    def remaining(self) -> int:
        return len(self.timesteps) - self.done_steps

    def batch_key(self) -> tuple:
        """Rows with equal keys can share one model call (same latent and conditioning shapes)."""
        return (tuple(self.latents.shape[1:]), self.latents.dtype,
                tuple((k, tuple(v.shape[1:])) for k, v in sorted(self.cond.items())))


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


def start_row(scheduler: Any, steps: int, latents: torch.Tensor, cond: Conditioning, uncond: Conditioning,
              guidance: float, *, start: int = 0, stop: int | None = None, seed: int | None = None) -> DenoiseRow:
    """A row that will run entries ``start .. stop-1`` of ``scheduler``'s ``steps``-step schedule.

    ``latents`` (1, C, H, W): unit Gaussian noise when ``start`` is 0 (scaled here by the scheduler's
    ``init_noise_sigma``), else the scheduler-space latents left after ``start`` entries (a split point).
    Schedulers that track a step index are told where to begin through their public ``set_begin_index``;
    the others (DDIM, DDPM) derive everything from the timestep itself.
    """
    scheduler.set_timesteps(steps, device=latents.device)
    total = len(scheduler.timesteps)
    stop = total if stop is None else stop
    if not 0 <= start <= stop <= total:
        raise ValueError(f"steps {start}..{stop} are outside the {total}-entry schedule")
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    if start == 0:
        latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    generator = torch.Generator("cpu").manual_seed(int(seed)) if seed is not None else None
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    return DenoiseRow(latents, cond, uncond, float(guidance), scheduler, scheduler.timesteps[start:stop],
                      generator, 0, kwargs)


def denoise_step(predict: Predictor, rows: Sequence[DenoiseRow]) -> None:
    """Advance every row one of its own timesteps, with one batched call of the denoiser.

    Rows must share :meth:`DenoiseRow.batch_key` (see :func:`group_rows`). Each row is scaled and stepped by its
    own scheduler and guided with its own scale, so its result does not depend on its batch mates.
    """
    if not rows:
        return
    if any(r.finished for r in rows):
        raise ValueError("a finished row cannot take another step")
    b = len(rows)
    ts = [r.timesteps[r.done_steps] for r in rows]
    # no_grad rather than inference_mode: callers (codec training) may feed the latents to autograd later.
    with torch.no_grad():
        scaled = torch.cat([_scale(r, t) for r, t in zip(rows, ts)])
        t = torch.stack(ts)
        both = {k: torch.cat([*(r.uncond[k] for r in rows), *(r.cond[k] for r in rows)]) for k in rows[0].cond}
        noise = predict(torch.cat([scaled, scaled]), torch.cat([t, t]), both)
        for i, (row, t_i) in enumerate(zip(rows, ts)):
            noise_uncond, noise_cond = noise[i:i + 1], noise[b + i:b + i + 1]
            guided = noise_uncond + row.guidance * (noise_cond - noise_uncond)
            row.latents = row.scheduler.step(guided, t_i, row.latents, **row._step_kwargs).prev_sample
            row.done_steps += 1


def group_rows(rows: Sequence[DenoiseRow], max_batch: int | None = None) -> list[list[DenoiseRow]]:
    """Unfinished rows in batches of equal :meth:`~DenoiseRow.batch_key` (first-come order), each ≤ ``max_batch``."""
    groups: dict[tuple, list[DenoiseRow]] = {}
    for row in rows:
        if not row.finished:
            groups.setdefault(row.batch_key(), []).append(row)
    size = max_batch or max(1, len(rows))
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def advance(predict: Predictor, rows: Sequence[DenoiseRow], max_batch: int | None = None) -> None:
    """One step for every unfinished row (one model call per compatible group)."""
    for group in group_rows(rows, max_batch):
        denoise_step(predict, group)


def denoise(predict: Predictor, rows: Sequence[DenoiseRow], keep: Callable[[DenoiseRow], bool] | None = None,
            max_batch: int | None = None) -> list[DenoiseRow]:
    """Run every row to the end of its timesteps; rows ``keep`` rejects (cancelled) leave at a step boundary.
    Returns the rows that were kept."""
    alive = list(rows)
    while True:
        if keep is not None:
            alive = [r for r in alive if keep(r)]
        if all(r.finished for r in alive):
            return alive
        advance(predict, alive, max_batch)


def _scale(row: DenoiseRow, t: torch.Tensor) -> torch.Tensor:
    scale = getattr(row.scheduler, "scale_model_input", None)
    return scale(row.latents, t) if scale is not None else row.latents

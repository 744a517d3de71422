"""The diffusion model as the step scheduler sees it: one step is one denoising step of every running request.

Each request is a row of the one denoising loop (:mod:`models.denoising`) with its own scheduler, so rows
with different step counts, split points and guidance scales share a batch, and a request's latents do not
depend on which requests it shared its batches with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from models.backends import RowSpec, TextToImageBackend
from models.denoising import DenoiseRow, advance


@dataclass(frozen=True)
class DiffusionJob:
    """One text-to-latents request."""

    prompt: str
    seed: int
    steps: int
    guidance_scale: float
    split_step: int                     # 0: all steps; k: stop after k (the device finishes)
    shape: tuple[int, int, int]         # latent (C, h, w)


@dataclass
class DiffusionState:
    job: DiffusionJob
    row: DenoiseRow
    text_encode_s: float                # the joiners' shared prompt-encoding call


class DiffusionStepModel:
    """:class:`~serving.scheduler.StepModel` of a text-to-image backend."""

    def __init__(self, backend: TextToImageBackend, max_batch: int | None = None) -> None:
        self.backend = backend
        self.max_batch = max_batch
        self._predict = backend.predictor()

    def admit(self, jobs: Sequence[DiffusionJob]) -> list[DiffusionState]:
        """Encode the joiners' prompts: one text-encoder call per latent shape (usually one for all)."""
        states: dict[int, DiffusionState] = {}
        by_shape: dict[tuple[int, int, int], list[int]] = {}
        for i, job in enumerate(jobs):
            by_shape.setdefault(job.shape, []).append(i)
        for shape, indexes in by_shape.items():
            started = time.perf_counter()
            specs = [RowSpec(jobs[i].prompt, jobs[i].seed, jobs[i].guidance_scale, jobs[i].steps,
                             stop=jobs[i].split_step or None) for i in indexes]
            rows = self.backend.start_rows(specs, shape)
            seconds = time.perf_counter() - started
            for i, row in zip(indexes, rows):
                states[i] = DiffusionState(jobs[i], row, seconds)
        return [states[i] for i in range(len(jobs))]

    def step(self, states: Sequence[DiffusionState]) -> None:
        advance(self._predict, [s.row for s in states], self.max_batch)

    def done(self, state: DiffusionState) -> bool:
        return state.row.finished

    def result(self, state: DiffusionState) -> torch.Tensor:
        """Latents (C, h, w) on the CPU: VAE space when complete, scheduler space after a split."""
        return self.backend.row_output(state.row, state.job.split_step)

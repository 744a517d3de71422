"""Split-point generation on the device: finish denoising steps k+1..N that the edge left over.

The device loads the same backend class as the edge (:mod:`models.backends`, chosen by the folder's family:
the embedded ldm family, SD 1.5, SDXL, SD3), lazily, only when a split request arrives, and continues
through its public :meth:`~models.backends.TextToImageBackend.finish`, which runs the one denoising loop
(:mod:`models.denoising`) from step k. So a split changes where compute happens, not the image (exactly for
schedulers that derive their state from the step, such as DDIM and Euler; multistep schedulers such as
DPM-Solver restart their history at the split and differ slightly).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from models.backends import ModelFolderError, TextToImageBackend, load_backend


class SplitFinisher:
    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = device
        self._lock = threading.Lock()
        self._backend: TextToImageBackend | None = None

    def backend(self) -> TextToImageBackend:
        """The model's backend, loaded on first use (the device's REST maps ValueError to a clean error)."""
        with self._lock:
            if self._backend is None:
                try:
                    self._backend = load_backend(self.model_dir, device=self.device)
                except ModelFolderError as exc:
                    raise ValueError(f"split-point generation needs the model on the device: {exc}") from exc
            return self._backend

    def finish(self, noisy_latents: torch.Tensor, prompt: str, split_step: int, total_steps: int,
               guidance_scale: float) -> torch.Tensor:
        """Scheduler-space latents (1, C, h, w) after ``split_step`` steps → final VAE-space latents."""
        if not 0 < split_step < total_steps:
            raise ValueError(f"split_step must be in [1, total_steps-1], got {split_step} of {total_steps}")
        return self.backend().finish(noisy_latents, prompt, split_step, total_steps, guidance_scale)

"""Split-point generation on the device: finish denoising steps k+1..N that the edge left over.

The device loads its own copy of the text encoder and UNet (lazily, only when a split request arrives) and
runs the same loop as the edge (:mod:`models.denoising`), so a split changes where compute happens, not the
image.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch

from models.denoising import DenoiseRows, run_steps, unet_predictor


class SplitFinisher:
    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._parts: tuple | None = None

    def _load(self) -> tuple:
        with self._lock:
            if self._parts is None:
                import diffusers
                from diffusers import UNet2DConditionModel
                from transformers import CLIPTextModel, CLIPTokenizer

                missing = [n for n in ("tokenizer", "text_encoder", "unet", "scheduler", "vae")
                           if not (self.model_dir / n).is_dir()]
                if missing:
                    raise ValueError(f"split-point generation needs {', '.join(missing)} in {self.model_dir}")
                tokenizer = CLIPTokenizer.from_pretrained(self.model_dir / "tokenizer")
                text_encoder = CLIPTextModel.from_pretrained(self.model_dir / "text_encoder", use_safetensors=True).eval()
                unet = UNet2DConditionModel.from_pretrained(self.model_dir / "unet", use_safetensors=True).eval()
                sched_config = json.loads((self.model_dir / "scheduler" / "scheduler_config.json").read_text())
                sched_cls = getattr(diffusers, sched_config.get("_class_name", "DDIMScheduler"))
                scaling = float(json.loads((self.model_dir / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215))
                self._parts = (tokenizer, text_encoder.to(self.device), unet.to(self.device), sched_cls, sched_config, scaling)
            return self._parts

    def finish(self, noisy_latents: torch.Tensor, prompt: str, split_step: int, total_steps: int,
               guidance_scale: float) -> torch.Tensor:
        """Scheduler-space latents after ``split_step`` steps → final VAE-space latents."""
        tokenizer, text_encoder, unet, sched_cls, sched_config, scaling = self._load()
        if noisy_latents.dim() != 4 or noisy_latents.shape[1] != unet.config.in_channels:
            raise ValueError(f"noisy latents have shape {tuple(noisy_latents.shape)}; the device UNet takes "
                             f"(1, {unet.config.in_channels}, h, w)")
        tokens = tokenizer([prompt, ""], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.inference_mode():
            embeds = text_encoder(tokens.input_ids.to(self.device))[0]
        scheduler = sched_cls.from_config(sched_config)
        scheduler.set_timesteps(total_steps, device=self.device)
        rows = DenoiseRows(noisy_latents.to(self.device), {"encoder_hidden_states": embeds[:1]},
                           {"encoder_hidden_states": embeds[1:]}, torch.tensor([guidance_scale], device=self.device))
        # Multistep schedulers track their own step index; advance it past the edge's steps.
        if hasattr(scheduler, "_step_index"):
            scheduler._step_index = split_step
        rows = run_steps(unet_predictor(unet), scheduler, rows, scheduler.timesteps[split_step:])
        return (rows.latents / scaling).cpu()

"""The device's lightweight decoders, loaded from local folders only.

Each decoder maps VAE-space latents (the edge's final latent divided by the VAE scaling factor) to images
in [0, 1]. Kinds: ``tiny`` (an AutoencoderTiny distilled from the VAE decoder: TAESD-style), ``robust``
(the same class fine-tuned on latents that crossed noisy channels: MEG-DT's customised decoder) and
``vae`` (the full AutoencoderKL decoder). A real checkpoint's folders (TAESD, TAESDXL, TAESD3, an SD VAE)
load the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: decoder kind -> subfolder of the model folder
DECODER_FOLDERS = {"tiny": "tiny_decoder", "robust": "robust_decoder", "vae": "vae"}


class DecoderUnavailableError(RuntimeError):
    """The requested decoder's folder is absent; the message says what to put where."""


class LatentDecoder:
    """One loaded decoder. Thread-safe for concurrent ``decode`` calls (inference only)."""

    def __init__(self, folder: Path, device: str = "cpu") -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny

        config = json.loads((folder / "config.json").read_text())
        cls_name = config.get("_class_name", "")
        self.kind_class = cls_name
        if cls_name == "AutoencoderTiny":
            self.model = AutoencoderTiny.from_pretrained(folder, use_safetensors=True)
        elif cls_name == "AutoencoderKL":
            self.model = AutoencoderKL.from_pretrained(folder, use_safetensors=True)
        else:
            raise DecoderUnavailableError(f"{folder}/config.json names {cls_name!r}; expected AutoencoderTiny or AutoencoderKL")
        self.model = self.model.to(device).eval()
        self.device = torch.device(device)
        self.folder = folder
        self.latent_channels = int(config.get("latent_channels", 4))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) VAE-space latents → (B, 3, H, W) images in [0, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decoder {self.folder.name} takes (B, {self.latent_channels}, h, w) latents, "
                             f"got {tuple(latents.shape)}")
        with torch.inference_mode():
            out = self.model.decode(latents.to(self.device, torch.float32)).sample
        # AutoencoderKL outputs [-1, 1]; AutoencoderTiny's decode() also maps to [-1, 1] in diffusers.
        return ((out.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


class DecoderBank:
    """Decoders of one model folder, loaded lazily on first use."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.model_dir = model_dir
        self.device = device
        self._loaded: dict[str, LatentDecoder] = {}
        self._lock = threading.Lock()

    def available(self) -> list[str]:
        return [k for k, sub in DECODER_FOLDERS.items() if (self.model_dir / sub / "config.json").is_file()]

    def resolve(self, kind: str, noisy: bool) -> str:
        """``auto`` picks the noise-robust decoder after a noisy channel and the tiny one otherwise, falling
        back to whatever the folder has."""
        if kind != "auto":
            return kind
        order = ["robust", "tiny", "vae"] if noisy else ["tiny", "robust", "vae"]
        for k in order:
            if k in self.available():
                return k
        raise DecoderUnavailableError(
            f"model folder {self.model_dir} holds no decoder: put an AutoencoderTiny in tiny_decoder/ or "
            "robust_decoder/, or an AutoencoderKL in vae/ (config.json + diffusion_pytorch_model.safetensors)")

    def get(self, kind: str) -> LatentDecoder:
        if kind not in DECODER_FOLDERS:
            raise DecoderUnavailableError(f"unknown decoder {kind!r}; known: auto, {', '.join(DECODER_FOLDERS)}")
        with self._lock:
            if kind not in self._loaded:
                folder = self.model_dir / DECODER_FOLDERS[kind]
                if not (folder / "config.json").is_file():
                    raise DecoderUnavailableError(
                        f"decoder {kind!r} needs {folder}/ with config.json and safetensors weights "
                        f"(available here: {', '.join(self.available()) or 'none'})")
                self._loaded[kind] = LatentDecoder(folder, self.device)
                log.info("loaded %s decoder from %s", kind, folder)
            return self._loaded[kind]

"""Real-checkpoint loaders (SD 1.5, SDXL, SD3 on the edge; TAESD-style and VAE decoders on the device),
exercised with the same diffusers/transformers classes built from tiny configs and saved to local folders.
Nothing is downloaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from device_client.decoders import DecoderBank, DecoderUnavailableError
from models.backends import BatchItem, ModelFolderError, detect_family, load_backend
from tiny_models import build_sd3, build_sdxl


def _generate(path: Path, split: int = 0) -> torch.Tensor:
    backend = load_backend(path)
    shape = backend.latent_shape(0, 0)
    items = [BatchItem("a red circle", seed, 3.0, threading.Event()) for seed in (1, 2)]
    out = backend.generate(items, 2, shape, split)
    assert all(t is not None and tuple(t.shape) == shape for t in out.latents)
    assert not torch.equal(out.latents[0], out.latents[1])  # per-request seeds
    return torch.stack(out.latents)


def test_sd15_layout_loads_and_generates(tiny_model_dir: Path) -> None:
    assert detect_family(tiny_model_dir) == "ldm"
    latents = _generate(tiny_model_dir)
    image = DecoderBank(tiny_model_dir).get("vae").decode(latents)
    assert image.shape[1] == 3 and 0 <= float(image.min()) and float(image.max()) <= 1


def test_sdxl_loads_through_the_edge_backend(tmp_path: Path) -> None:
    path = build_sdxl(tmp_path)
    assert detect_family(path) == "sdxl"
    latents = _generate(path)
    assert latents.shape[1] == 4
    bank = DecoderBank(path)
    assert bank.resolve("auto", noisy=False) == "tiny"
    assert bank.get("tiny").decode(latents).shape[1] == 3


def test_sd3_loads_with_16_channel_latents(tmp_path: Path) -> None:
    path = build_sd3(tmp_path)
    assert detect_family(path) == "sd3"
    latents = _generate(path)
    assert latents.shape[1] == 16
    assert DecoderBank(path).get("tiny").decode(latents).shape[1] == 3
    assert DecoderBank(path).get("vae").decode(latents).shape[1] == 3


def test_missing_folders_say_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_backend(tmp_path / "nowhere")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelFolderError, match="tokenizer/"):
        load_backend(tmp_path / "half")
    with pytest.raises(DecoderUnavailableError, match="tiny_decoder/"):
        DecoderBank(tmp_path / "half").resolve("auto", noisy=False)

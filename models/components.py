"""Architectures of the shapes_v1 family and helpers to load/save its component folders.

Why one module: the training stages, the evaluation and the tests must agree on folder names
and hyper-parameters. Everything is an off-the-shelf diffusers/transformers class, sized so the
whole family stays a few MB and trains on a 2-core CPU in about an hour.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DDPMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

LATENT_CHANNELS: Final[int] = 4
LATENT_SIZE: Final[int] = 16
TEXT_HIDDEN: Final[int] = 64

#: Sub-folder names under the model root (diffusers pipeline layout).
TOKENIZER: Final[str] = "tokenizer"
TEXT_ENCODER: Final[str] = "text_encoder"
VAE: Final[str] = "vae"
UNET: Final[str] = "unet"
SCHEDULER: Final[str] = "scheduler"
TINY_DECODER: Final[str] = "tiny_decoder"
ROBUST_DECODER: Final[str] = "robust_decoder"
CLASSIFIER: Final[str] = "classifier"

#: Noise schedule shared by training (DDPM) and sampling (DDIM). The "linear" DDPM betas reach
#: a lower final SNR than SD's scaled_linear, which matters at 16x16 latents, and
#: v-prediction with "trailing" spacing keeps 20-step DDIM sampling accurate.
SCHEDULE_KWARGS: Final[dict[str, object]] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


def new_vae() -> AutoencoderKL:
    """64x64x3 <-> 4x16x16 KL autoencoder (two downsamples)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,  # replaced by 1/std(latents) after training
        mid_block_add_attention=False,
    )


def new_text_encoder(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> CLIPTextModel:
    """Two-layer CLIP text transformer, hidden size 64, context 16 tokens."""
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    return CLIPTextModel(config)


def new_unet() -> UNet2DConditionModel:
    """Conditional denoiser on 4x16x16 latents; cross-attention at 8x8 and 4x4 (cheap on CPU)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def new_tiny_decoder(scaling_factor: float) -> AutoencoderTiny:
    """TAESD-style AutoencoderTiny with ×4 up/down-sampling (3 stages)."""
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(24, 24, 24),
        decoder_block_out_channels=(24, 24, 24),
        num_encoder_blocks=(1, 1, 1),
        num_decoder_blocks=(1, 1, 1),
        latent_channels=LATENT_CHANNELS,
        scaling_factor=scaling_factor,
    )


def new_train_scheduler() -> DDPMScheduler:
    """DDPM scheduler used to add noise during UNet training."""
    return DDPMScheduler(**SCHEDULE_KWARGS)


def new_sampling_scheduler() -> DDIMScheduler:
    """DDIM scheduler committed with the model; works with ~20 steps."""
    return DDIMScheduler(
        **SCHEDULE_KWARGS, timestep_spacing="trailing", set_alpha_to_one=False, steps_offset=0
    )


def load_tokenizer(root: str | Path) -> CLIPTokenizer:
    """Load the committed CLIPTokenizer."""
    return CLIPTokenizer.from_pretrained(str(Path(root) / TOKENIZER))


def load_text_encoder(root: str | Path) -> CLIPTextModel:
    """Load the text encoder in eval mode."""
    return CLIPTextModel.from_pretrained(str(Path(root) / TEXT_ENCODER)).eval()


def load_vae(root: str | Path) -> AutoencoderKL:
    """Load the VAE in eval mode."""
    return AutoencoderKL.from_pretrained(str(Path(root) / VAE)).eval()


def load_unet(root: str | Path) -> UNet2DConditionModel:
    """Load the UNet in eval mode."""
    return UNet2DConditionModel.from_pretrained(str(Path(root) / UNET)).eval()


def load_scheduler(root: str | Path) -> DDIMScheduler:
    """Load the committed DDIM scheduler."""
    return DDIMScheduler.from_pretrained(str(Path(root) / SCHEDULER))


def load_tiny(root: str | Path, name: str = TINY_DECODER) -> AutoencoderTiny:
    """Load ``tiny_decoder`` or ``robust_decoder`` in eval mode."""
    return AutoencoderTiny.from_pretrained(str(Path(root) / name)).eval()


def count_parameters(module: torch.nn.Module) -> int:
    """Number of parameters (for the model card)."""
    return sum(p.numel() for p in module.parameters())


def write_model_index(root: str | Path) -> None:
    """Write a diffusers-style ``model_index.json`` listing the components present in ``root``."""
    root = Path(root)
    entries: dict[str, object] = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _diffusers_version(),
        "_meg_family": "shapes_v1",
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    known = {
        TOKENIZER: ["transformers", "CLIPTokenizer"],
        TEXT_ENCODER: ["transformers", "CLIPTextModel"],
        VAE: ["diffusers", "AutoencoderKL"],
        UNET: ["diffusers", "UNet2DConditionModel"],
        SCHEDULER: ["diffusers", "DDIMScheduler"],
    }
    for name, spec in known.items():
        if (root / name).is_dir():
            entries[name] = spec
    extras = {
        TINY_DECODER: ["diffusers", "AutoencoderTiny"],
        ROBUST_DECODER: ["diffusers", "AutoencoderTiny"],
        CLASSIFIER: ["models.classifier", "ShapesClassifier"],
    }
    # Non-pipeline components live under their own key so StableDiffusionPipeline ignores them.
    entries["_meg_extra_components"] = {n: s for n, s in extras.items() if (root / n).is_dir()}
    (root / "model_index.json").write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__

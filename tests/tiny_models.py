"""Tiny random-weight model folders built from config, in the exact diffusers layout of a real checkpoint.

They exercise the same loading code paths as SD 1.5 / TAESD folders (tests never download anything).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL, AutoencoderTiny, DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def save_char_tokenizer(folder: Path, max_length: int = 16) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): every word splits into letters."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        vocab[s] = len(vocab)
        vocab[s + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(folder)
    return tok


def build_tiny_ldm(root: Path, seed: int = 0, with_decoders: bool = True) -> Path:
    """An SD-1.x-layout folder: tokenizer, text_encoder, unet, scheduler, vae (+ tiny/robust decoders)."""
    torch.manual_seed(seed)
    tok = save_char_tokenizer(root / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).save_pretrained(root / "scheduler")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.5)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    if with_decoders:
        for name in ("tiny_decoder", "robust_decoder"):
            tiny = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8, 8),
                                   decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1),
                                   num_decoder_blocks=(1, 1, 1), latent_channels=4, upsampling_scaling_factor=2)
            tiny.save_pretrained(root / name, safe_serialization=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


def _clip(tok_len: int, with_projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=tok_len, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, projection_dim=32,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _vae(latent_channels: int, **extra: float) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def _tiny_decoder(latent_channels: int) -> AutoencoderTiny:
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=latent_channels)


def build_sdxl(root: Path) -> Path:
    torch.manual_seed(0)
    tok = save_char_tokenizer(root / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                projection_class_embeddings_input_dim=32 + 6 * 8, cross_attention_dim=64,
                                norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(vae=_vae(4), text_encoder=_clip(len(tok), False), tokenizer=tok,
                                     text_encoder_2=_clip(len(tok), True), tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(root / "sdxl", safe_serialization=True)
    _tiny_decoder(4).save_pretrained(root / "sdxl" / "tiny_decoder", safe_serialization=True)  # TAESDXL's place
    return root / "sdxl"


def build_sd3(root: Path) -> Path:
    torch.manual_seed(0)
    tok = save_char_tokenizer(root / "_tok")
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=32)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=_vae(16, scaling_factor=1.5, shift_factor=0.06),
                                    text_encoder=_clip(len(tok), True), tokenizer=tok,
                                    text_encoder_2=_clip(len(tok), True), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(root / "sd3", safe_serialization=True)
    _tiny_decoder(16).save_pretrained(root / "sd3" / "tiny_decoder", safe_serialization=True)  # TAESD3's place
    return root / "sd3"

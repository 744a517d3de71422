"""Real-checkpoint loaders (SD 1.5, SDXL, SD3 on the edge; TAESD-style and VAE decoders on the device),
exercised with the same diffusers/transformers classes built from tiny configs and saved to local folders.
Nothing is downloaded."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL, AutoencoderTiny, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline, UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from device_client.decoders import DecoderBank, DecoderUnavailableError
from edge_server.backends import BatchItem, ModelFolderError, detect_family, load_backend
from tiny_models import save_char_tokenizer


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

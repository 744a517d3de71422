"""Tiny random Llama / Qwen2 / Mistral checkpoints built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64
FAMILIES = ("llama", "qwen2", "mistral", "qwen2-sliding")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: specials, lowercase letters, digits and some punctuation."""
    symbols = ["<pad>", "<s>", "</s>", *"abcdefghijklmnopqrstuvwxyz0123456789 .,:?!\n"]
    backend = Tokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(family: str, layers: int = 4, hidden: int = 48, seed: int = 0) -> PreTrainedModel:
    """A random model of ``family`` (2-4 layers, hidden 32-64, grouped-query attention)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "qwen2-sliding":  # layers from max_window_layers on attend within a window of 5
        return Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=True, sliding_window=5,
                                            max_window_layers=layers // 2)).eval()
    if family == "mistral":  # a window shorter than the test sequences, so the mask's window matters
        return MistralForCausalLM(MistralConfig(**common, sliding_window=6)).eval()
    raise ValueError(family)


def save_tiny(folder: Path, family: str, layers: int = 3) -> PreTrainedModel:
    """Save a tiny model and its tokenizer as a checkpoint folder (config.json, model.safetensors, tokenizer)."""
    model = tiny_model(family, layers=layers)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model

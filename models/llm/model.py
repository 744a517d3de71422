"""The embedded LLM's architecture: a small ``LlamaForCausalLM`` built from a config (no download).

Why Llama: the split (:mod:`models.llm.split`) and the loader (:mod:`models.llm.loader`) are written for
the Llama-family decoder (Llama, Qwen2, Mistral share it), so the embedded model exercises exactly the
code paths a real checkpoint does, at a size that trains on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LlmModelConfig:
    """Architecture of the embedded model (defaults: 1.12 M parameters).

    Answering "what colour is the square?" composes two attention hops (fetch the question's shape to
    the answer position, look up the object token holding it), so a few layers suffice; four layers of
    width 128 train at ~0.6 s per 64-document step on one shared CPU thread, which fits the budget of
    4,000 steps (six layers were 35 % slower per step).
    """

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def llama_config(cfg: LlmModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The transformers config: tied input/output embeddings (they are a large share of a tiny model)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def new_model(cfg: LlmModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model (seeded, so runs are reproducible)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(cfg, tokenizer))


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy, and one line: generation stops at ``</s>`` or at the newline that ends an answer (training
    documents may ask further questions after an answer, so the model cannot know that it should stop)."""
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1, "the newline must be one token"
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, newline[0]],
        pad_token_id=tokenizer.pad_token_id,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

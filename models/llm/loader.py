"""Load a local transformers Llama-family checkpoint (the embedded default or a real one), never downloading.

Supported: the decoder families whose layers the split (:mod:`models.llm.split`) drives as they are:
``model.model.embed_tokens``, ``model.model.layers[i](hidden, attention_mask=, position_embeddings=,
cache=)``, ``model.model.norm``, ``model.model.rotary_emb``, ``model.lm_head`` (Llama, Qwen2, Qwen3,
Mistral). A missing or unsupported folder fails with a message saying what to put where.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: ``model_type`` values of config.json that load_llm accepts.
SUPPORTED_MODEL_TYPES: Final[tuple[str, ...]] = ("llama", "qwen2", "qwen3", "mistral")
TOKENIZER_FILES: Final[tuple[str, ...]] = ("tokenizer.json", "tokenizer.model", "vocab.json")

_LAYOUT: Final[str] = (
    "A model folder needs config.json (model_type one of {types}), the weights as *.safetensors "
    "(model.safetensors, or shards with model.safetensors.index.json) and the tokenizer files "
    "(tokenizer.json + tokenizer_config.json, or tokenizer.model / vocab.json + merges.txt), e.g. a local copy "
    "of a Llama, Qwen2 or Mistral checkpoint. Nothing is downloaded."
)


class LlmFolderError(ValueError):
    """The folder is missing, incomplete or holds an unsupported model."""


@dataclass
class LoadedLlm:
    """A causal LM and its tokenizer, in eval mode."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


def check_folder(path: str | Path) -> dict[str, object]:
    """Validate the folder's layout without loading weights; returns its config.json as a dict."""
    root = Path(path)
    layout = _LAYOUT.format(types=", ".join(SUPPORTED_MODEL_TYPES))
    if not root.is_dir():
        raise LlmFolderError(f"LLM folder {root} does not exist. {layout}")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise LlmFolderError(f"{root} has no config.json. {layout}")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise LlmFolderError(
            f"{cfg_path}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(decoders whose layers the edge/device split can run). {layout}"
        )
    if not any(root.glob("*.safetensors")):
        found = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {', '.join(found)}: only safetensors weights are loaded)" if found else ""
        raise LlmFolderError(f"{root} has no *.safetensors weights{hint}. {layout}")
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise LlmFolderError(f"{root} has no tokenizer files ({' / '.join(TOKENIZER_FILES)}). {layout}")
    return config


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer (local files only)."""
    root = Path(path)
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise LlmFolderError(
            f"{root} has no tokenizer ({' / '.join(TOKENIZER_FILES)}); for the embedded model run "
            "`meg train llm tokenizer --out {root}` first."
        )
    return AutoTokenizer.from_pretrained(str(root), local_files_only=True)


def load_llm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedLlm:
    """Load model and tokenizer from a local folder (``local_files_only=True``; safetensors only).

    Raises :class:`LlmFolderError` naming what is missing and where it goes.
    """
    root = Path(path)
    check_folder(root)
    tokenizer = load_tokenizer(root)
    model = AutoModelForCausalLM.from_pretrained(
        str(root), local_files_only=True, use_safetensors=True, dtype=dtype
    )
    model.to(device).eval()
    logger.info("loaded %s (%s, %d layers) from %s", type(model).__name__, model.config.model_type,
                model.config.num_hidden_layers, root)
    return LoadedLlm(model, tokenizer, root)


def llm_model_id(path: str | Path) -> str:
    """The id a served model answers to: ``shapes-llm-v1`` for the embedded folder, else the folder's name."""
    name = Path(path).resolve().name
    return "shapes-llm-v1" if name == "shapes_llm_v1" else name

"""load_llm on local Llama / Qwen2 / Mistral folders (tiny, built here) and its errors for bad folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llm_tiny import save_tiny

from models.llm.loader import SUPPORTED_MODEL_TYPES, LlmFolderError, load_llm
from models.llm.split import DeviceHalf, EdgeHalf, split_generate


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_loads_a_local_checkpoint_and_splits_it(tmp_path: Path, family: str) -> None:
    original = save_tiny(tmp_path, family)
    assert (tmp_path / "config.json").is_file() and any(tmp_path.glob("*.safetensors"))
    llm = load_llm(tmp_path)
    assert type(llm.model) is type(original) and llm.model.config.model_type == family
    assert not llm.model.training
    ids = llm.tokenizer("abc def.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(llm.model(ids).logits, original(ids).logits)
    ref = llm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
    for k in range(1, llm.num_layers + 1):
        assert split_generate(EdgeHalf(llm.model, k), DeviceHalf(llm.model, k), ids, 8) == ref


def test_missing_folder_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(LlmFolderError, match="does not exist") as err:
        load_llm(tmp_path / "nowhere")
    for needed in ("config.json", "safetensors", "tokenizer.json", *SUPPORTED_MODEL_TYPES):
        assert needed in str(err.value)


def test_incomplete_folders_name_the_missing_part(tmp_path: Path) -> None:
    save_tiny(tmp_path / "full", "llama")
    no_config = shutil.copytree(tmp_path / "full", tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(LlmFolderError, match="no config.json"):
        load_llm(no_config)
    no_weights = shutil.copytree(tmp_path / "full", tmp_path / "no_weights")
    for f in no_weights.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(LlmFolderError, match=r"no \*.safetensors weights \(found model.bin"):
        load_llm(no_weights)
    no_tokenizer = shutil.copytree(tmp_path / "full", tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(LlmFolderError, match="no tokenizer files"):
        load_llm(no_tokenizer)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    save_tiny(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmFolderError, match="'gpt2' is not supported; supported: llama, qwen2"):
        load_llm(tmp_path)

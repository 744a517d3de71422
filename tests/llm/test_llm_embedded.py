"""The committed embedded LLM (models/shapes_llm_v1): layout, held-out accuracy, chat template, and the
split's identity with ``model.generate`` (exact float32 transfer) and its fp16 agreement.

The default run uses quick subsets; the full 100-prompt identity and the full held-out accuracy are
marked ``slow``."""

from __future__ import annotations

import json

import pytest
import torch

from models.llm import DEFAULT_LLM_DIR
from models.llm.evaluate import fp16_agreement, split_points, to_fp16
from models.llm.loader import LoadedLlm, load_llm
from models.llm.model import count_parameters
from models.llm.split import DeviceHalf, EdgeHalf, split_generate
from models.llm.tasks import KINDS, answer_accuracy, heldout_prompts, hf_generate_fn, split_generate_fn

torch.set_num_threads(1)

pytestmark = pytest.mark.skipif(not (DEFAULT_LLM_DIR / "model.safetensors").is_file(),
                                reason="the embedded LLM is not committed in this checkout")
MAX_NEW = 4


@pytest.fixture(scope="module")
def llm() -> LoadedLlm:
    return load_llm(DEFAULT_LLM_DIR)


def _subset(per_kind: int) -> list:
    prompts = heldout_prompts()
    return [q for kind in KINDS for q in [p for p in prompts if p.kind == kind][:per_kind]]


def test_folder_layout_and_size(llm: LoadedLlm) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "MODEL_CARD.md", "metrics.json"):
        assert (DEFAULT_LLM_DIR / name).is_file(), name
    assert type(llm.model).__name__ == "LlamaForCausalLM"
    assert 1_000_000 <= count_parameters(llm.model) <= 5_000_000
    assert sum(f.stat().st_size for f in DEFAULT_LLM_DIR.iterdir()) < 8_000_000
    assert "chat_template" in json.loads((DEFAULT_LLM_DIR / "tokenizer_config.json").read_text())


def test_committed_metrics_meet_the_bar() -> None:
    metrics = json.loads((DEFAULT_LLM_DIR / "metrics.json").read_text())
    greedy = metrics["greedy"]
    assert greedy["prompts"] >= 400 and set(greedy["prompts_per_kind"]) == set(KINDS)
    assert all(acc >= 0.95 for acc in greedy["per_kind_accuracy"].values()), greedy["per_kind_accuracy"]
    assert all(v == 1.0 for v in metrics["split_identity_exact_fp32"]["share_identical_by_k"].values())


def test_quick_heldout_accuracy(llm: LoadedLlm) -> None:
    """12 held-out prompts per kind, answered live (the committed metrics.json holds the full 480)."""
    report = answer_accuracy(hf_generate_fn(llm.model, llm.tokenizer, MAX_NEW), _subset(12))
    assert all(acc >= 0.9 for acc in report.per_kind.values()), report.failures[:5]


@pytest.mark.slow
def test_full_heldout_accuracy(llm: LoadedLlm) -> None:
    report = answer_accuracy(hf_generate_fn(llm.model, llm.tokenizer, MAX_NEW), heldout_prompts())
    assert report.n >= 400 and all(acc >= 0.95 for acc in report.per_kind.values()), report.per_kind


def test_chat_template_prompt_is_answered(llm: LoadedLlm) -> None:
    qa = _subset(1)[0]
    messages = [{"role": "user", "content": qa.prompt.removesuffix("\nAnswer:")}]
    ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=False)
    assert llm.tokenizer.decode(ids[0]) == qa.prompt
    out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW)
    assert llm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0] == " " + qa.answer


def _identity(llm: LoadedLlm, prompts: list, k: int) -> list[str]:
    """Prompts whose split greedy tokens differ from model.generate's (empty when identical)."""
    edge, device = EdgeHalf(llm.model, k), DeviceHalf(llm.model, k)
    tok = llm.tokenizer
    differ = []
    for qa in prompts:
        ids = tok(qa.prompt, return_tensors="pt").input_ids
        # No end-of-sequence on either side: decode past the answer line, so every prompt checks 8 steps.
        ref = llm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                 pad_token_id=tok.pad_token_id, eos_token_id=None)[0, ids.shape[1]:].tolist()
        if split_generate(edge, device, ids, 8, eos_token_id=None) != ref:
            differ.append(qa.prompt)
    return differ


def test_split_equals_generate_quick(llm: LoadedLlm) -> None:
    prompts = _subset(3)
    for k in split_points(llm.num_layers):
        assert _identity(llm, prompts, k) == [], f"k={k}"


@pytest.mark.slow
def test_split_equals_generate_on_100_heldout_prompts(llm: LoadedLlm) -> None:
    prompts = _subset(25)
    assert len(prompts) == 100
    for k in split_points(llm.num_layers):
        assert _identity(llm, prompts, k) == [], f"k={k}"


def test_fp16_hidden_state_keeps_next_token_agreement(llm: LoadedLlm) -> None:
    texts = [qa.text for qa in _subset(10)]
    for k in sorted({1, llm.num_layers // 2}):
        assert fp16_agreement(llm, texts, k) >= 0.99, f"k={k}"
    report = answer_accuracy(split_generate_fn(llm.model, llm.tokenizer, llm.num_layers // 2, to_fp16, MAX_NEW),
                             _subset(5))
    assert report.overall >= 0.9

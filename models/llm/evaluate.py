"""``meg train llm evaluate``: what the embedded LLM scores and what its split sends -> ``metrics.json``.

* greedy accuracy per question kind on the held-out prompts (:func:`models.llm.tasks.heldout_prompts`,
  scenes training never saw), monolithic ``model.generate``;
* split identity: for each split layer ``k`` probed, the share of prompts whose split greedy tokens
  (exact float32 transfer) equal ``model.generate``'s token for token;
* float16 transfer: teacher-forced next-token agreement over every position of the evaluation texts,
  and greedy accuracy when the hidden states are rounded to float16 on the way;
* |h| statistics of the transmitted hidden states at ``k = 1`` and ``k = L/2`` (max, median, p99, the
  largest channel), which size the hidden-state codecs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from models.llm.loader import LoadedLlm, load_llm
from models.llm.model import count_parameters
from models.llm.split import DeviceHalf, EdgeHalf, split_generate
from models.llm.tasks import PER_KIND, answer_accuracy, heldout_prompts, hf_generate_fn, split_generate_fn

logger = logging.getLogger(__name__)

IDENTITY_PROMPTS = 100
IDENTITY_TOKENS = 8
MAX_NEW_TOKENS = 4


def to_fp16(h: torch.Tensor) -> torch.Tensor:
    """The float16 transfer: round to half precision (what a raw-fp16 codec sends)."""
    return h.to(torch.float16)


def split_points(num_layers: int) -> list[int]:
    """The split layers probed: first, middle, last-but-one and all layers on the edge."""
    return sorted({1, num_layers // 2, max(1, num_layers - 1), num_layers})


@torch.no_grad()
def split_identity(llm: LoadedLlm, prompts: list[str], k: int) -> float:
    """Share of prompts whose split greedy token ids (:data:`IDENTITY_TOKENS` of them) equal
    ``model.generate(do_sample=False)``'s."""
    edge, device = EdgeHalf(llm.model, k), DeviceHalf(llm.model, k)
    tok = llm.tokenizer
    same = 0
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids
        # No end-of-sequence on either side, so each prompt checks IDENTITY_TOKENS decode steps (past the answer).
        ref = llm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                                 max_new_tokens=IDENTITY_TOKENS, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        got = split_generate(edge, device, ids, IDENTITY_TOKENS, eos_token_id=None)
        same += int(got == ref.tolist())
    return same / len(prompts)


@torch.no_grad()
def hidden_statistics(llm: LoadedLlm, texts: list[str], k: int) -> dict[str, float]:
    """|h| over every row of every text's prefill at split ``k`` (the tensors the edge transmits)."""
    edge = EdgeHalf(llm.model, k)
    rows = []
    for text in texts:
        edge.reset()
        rows.append(edge.prefill(llm.tokenizer(text, return_tensors="pt").input_ids)[0])
    h = torch.cat(rows).abs()
    channel_max = h.max(dim=0).values
    flat = h.flatten()
    sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return {
        "rows": float(h.shape[0]),
        "max_abs": float(flat.max()),
        "median_abs": float(flat.median()),
        "mean_abs": float(flat.mean()),
        "p99_abs": float(sample.quantile(0.99)),
        "rms": float(flat.pow(2).mean().sqrt()),
        "max_over_median": float(flat.max() / flat.median()),
        "top_channel": float(channel_max.argmax()),
        "top_channel_max_abs": float(channel_max.max()),
        "second_channel_max_abs": float(channel_max.topk(2).values[1]),
    }


@torch.no_grad()
def fp16_agreement(llm: LoadedLlm, texts: list[str], k: int) -> float:
    """Teacher-forced next-token agreement (every position) between exact and float16-rounded transfer."""
    edge, device = EdgeHalf(llm.model, k), DeviceHalf(llm.model, k)
    agree = total = 0
    for text in texts:
        edge.reset()
        h = edge.prefill(llm.tokenizer(text, return_tensors="pt").input_ids)
        device.reset()
        exact = device.prefill(h, 0, all_rows=True).argmax(-1)
        device.reset()
        rounded = device.prefill(to_fp16(h), 0, all_rows=True).argmax(-1)
        agree += int((exact == rounded).sum())
        total += exact.numel()
    return agree / total


def evaluate_folder(folder: Path, smoke: bool = False) -> dict[str, object]:
    """All metrics of the model in ``folder`` (smoke: a handful of prompts)."""
    llm = load_llm(folder)
    n_layers = llm.num_layers
    prompts = heldout_prompts(per_kind=4 if smoke else PER_KIND)
    texts = [qa.text for qa in prompts]
    greedy = answer_accuracy(hf_generate_fn(llm.model, llm.tokenizer, MAX_NEW_TOKENS), tqdm(prompts, desc="greedy"))
    n_id = 8 if smoke else IDENTITY_PROMPTS
    # Every 5th prompt, so the identity subset holds all four kinds.
    id_prompts = [qa.prompt for qa in prompts[:: max(1, len(prompts) // n_id)]][:n_id]
    identity = {str(k): split_identity(llm, id_prompts, k) for k in tqdm(split_points(n_layers), desc="identity")}
    mid = max(1, n_layers // 2)
    fp16_acc = answer_accuracy(split_generate_fn(llm.model, llm.tokenizer, mid, to_fp16, MAX_NEW_TOKENS), prompts)
    metrics: dict[str, object] = {
        "model": {"class": type(llm.model).__name__, "parameters": count_parameters(llm.model), "layers": n_layers,
                  "hidden_size": int(llm.model.config.hidden_size), "vocab_size": len(llm.tokenizer)},
        "heldout": "scenes whose object set is held out (models.llm.corpus.heldout_sets); "
                   "models.llm.tasks.heldout_prompts(per_kind=120, seed=2024)",
        "greedy": greedy.to_dict(),
        "split_identity_exact_fp32": {"prompts": len(id_prompts), "share_identical_by_k": identity},
        "fp16_transfer": {
            "next_token_agreement_by_k": {str(k): fp16_agreement(llm, texts, k) for k in sorted({1, mid})},
            f"greedy_per_kind_accuracy_k{mid}": fp16_acc.per_kind,
        },
        "hidden_abs_by_k": {str(k): hidden_statistics(llm, texts, k) for k in sorted({1, mid})},
    }
    logger.info("greedy %s; split identity %s", greedy.per_kind, identity)
    return metrics

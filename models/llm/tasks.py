"""Held-out evaluation set of the embedded LLM and an accuracy helper for any generate function.

``answer_accuracy(generate_fn, prompts)`` takes a function from prompt text to generated continuation
text, so the same numbers can be measured for the monolithic model (:func:`hf_generate_fn`), the split
model in one process, or the split model over the emulated channel (the benchmark's generate).

A continuation is correct when its first line is exactly one space followed by the expected answer
(``" blue"`` for ``"Answer: blue\\n"``); anything after the first newline is ignored, so generate
functions may stop at the newline, at ``</s>`` or after a fixed number of tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import permutations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.llm.corpus import KINDS, QA, Scene, make_qa, split_sets

#: Prompts per question kind in the default evaluation set (4 x 120 = 480 >= 400; even, so yes/no balance exactly).
PER_KIND: int = 120
EVAL_SEED: int = 2024


def heldout_scenes() -> list[Scene]:
    """Every ordering of every held-out object set (training never sees any of them)."""
    scenes: list[Scene] = []
    for objs in split_sets("heldout"):
        scenes.extend(permutations(sorted(objs)))
    return scenes


def heldout_prompts(per_kind: int = PER_KIND, seed: int = EVAL_SEED) -> list[QA]:
    """``per_kind`` distinct held-out questions of each kind in :data:`~models.llm.corpus.KINDS` order.

    ``exists`` questions alternate yes/no, so they are balanced exactly (half of the "no" questions are
    hard negatives when the scene has two or more objects: colour and shape both present, unbound).
    Deterministic for a given seed.
    """
    rng = random.Random(seed)
    scenes = heldout_scenes()
    out: list[QA] = []
    for kind in KINDS:
        seen: set[str] = set()
        tries = 0
        while len(seen) < per_kind:
            tries += 1
            if tries > 200 * per_kind:
                raise ValueError(f"only {len(seen)} distinct held-out {kind!r} prompts exist, {per_kind} asked")
            yes = len(seen) % 2 == 0 if kind == "exists" else None
            qa = make_qa(rng.choice(scenes), kind, rng, answer_yes=yes)
            if qa.prompt not in seen:
                seen.add(qa.prompt)
                out.append(qa)
    return out


@dataclass
class AccuracyReport:
    """Greedy answer accuracy per question kind (fractions in [0, 1])."""

    per_kind: dict[str, float]
    overall: float
    n: int
    counts: dict[str, int]
    hard_negative: float | None  # accuracy on the "no" questions that are hard negatives
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (prompt, expected, got)

    def to_dict(self) -> dict[str, object]:
        return {
            "per_kind_accuracy": self.per_kind,
            "overall_accuracy": self.overall,
            "prompts": self.n,
            "prompts_per_kind": self.counts,
            "exists_hard_negative_accuracy": self.hard_negative,
            "failures_shown": [list(f) for f in self.failures[:20]],
        }


def is_correct(continuation: str, answer: str) -> bool:
    """The first line of the continuation is exactly ``" " + answer``."""
    return continuation.split("\n", 1)[0] == " " + answer


def answer_accuracy(generate_fn: Callable[[str], str], prompts: Sequence[QA]) -> AccuracyReport:
    """Run ``generate_fn(prompt.prompt)`` on every prompt and score it with :func:`is_correct`."""
    if not prompts:
        raise ValueError("no prompts to evaluate")
    right: dict[str, list[bool]] = {}
    hard: list[bool] = []
    failures: list[tuple[str, str, str]] = []
    for qa in prompts:
        got = generate_fn(qa.prompt)
        ok = is_correct(got, qa.answer)
        right.setdefault(qa.kind, []).append(ok)
        if qa.hard_negative:
            hard.append(ok)
        if not ok:
            failures.append((qa.prompt, qa.completion, got))
    flat = [ok for oks in right.values() for ok in oks]
    return AccuracyReport(
        per_kind={k: sum(v) / len(v) for k, v in right.items()},
        overall=sum(flat) / len(flat),
        n=len(flat),
        counts={k: len(v) for k, v in right.items()},
        hard_negative=sum(hard) / len(hard) if hard else None,
        failures=failures,
    )


def hf_generate_fn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int = 4
) -> Callable[[str], str]:
    """Greedy ``model.generate`` as a prompt -> continuation function (the monolithic reference)."""

    @torch.no_grad()
    def generate(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return generate


def split_generate_fn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    k: int,
    transfer: Callable[[torch.Tensor], torch.Tensor] = lambda h: h,
    max_new_tokens: int = 4,
) -> Callable[[str], str]:
    """Greedy generation through :class:`~models.llm.split.EdgeHalf` / :class:`~models.llm.split.DeviceHalf`
    split at layer ``k``, the hidden states passed through ``transfer`` (identity: exact float32)."""
    from models.llm.split import DeviceHalf, EdgeHalf, split_generate

    edge, device = EdgeHalf(model, k), DeviceHalf(model, k)
    # Stop where model.generate stops (the generation config's end tokens), so both return the same text.
    stop = model.generation_config.eos_token_id if model.generation_config is not None else tokenizer.eos_token_id

    def generate(prompt: str) -> str:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = split_generate(edge, device, ids, max_new_tokens, stop, transfer=transfer)
        return tokenizer.decode(out, skip_special_tokens=True)

    return generate


__all__ = ["AccuracyReport", "KINDS", "answer_accuracy", "heldout_prompts", "heldout_scenes", "hf_generate_fn",
           "is_correct", "split_generate_fn"]

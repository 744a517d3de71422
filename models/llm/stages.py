"""Training stages of the embedded LLM (``meg train llm <stage>``); each is ``run(opts) -> dict``.

* ``data``: write a preview of the training mixture and the held-out split's sizes;
* ``tokenizer``: build the byte-level word tokenizer (+ chat template) into ``--out``;
* ``train``: train the ``LlamaForCausalLM`` on freshly generated documents, loss weighted on answers;
* ``evaluate``: greedy held-out accuracy per question kind, hidden-state statistics at the split
  points, fp16 transfer agreement -> ``metrics.json``.

Why a fresh batch every step: the corpus is a pure function of a seed, so batch ``i`` is drawn from
``Random((seed, i))``; resuming from a checkpoint at step ``i`` therefore replays exactly the batches an
uninterrupted run would have seen, without storing any data.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from models.llm import corpus
from models.llm.corpus import Document
from models.llm.model import LlmModelConfig, count_parameters, generation_config, new_model
from models.llm.tokenizer import save_tokenizer
from models.trainer import StageOptions, run_loop

logger = logging.getLogger(__name__)

#: Loss weight of the answer token relative to every other token (scene words are random draws whose
#: loss cannot go below log 6; without the weight their gradient noise drowns the answer's signal).
ANSWER_WEIGHT: float = 8.0
#: Steps of one-object scenes before the full mixture (see corpus.training_document).
CURRICULUM_STEPS: int = 200
#: Held-out prompts scored (teacher-forced, one forward pass) every ``eval_every`` steps during training.
PROBE_PROMPTS: int = 240


@dataclass
class Batch:
    """Right-padded token ids, their mask, and a loss weight per *target* position (``[:, 1:]``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    weights: torch.Tensor


def encode_documents(tokenizer: PreTrainedTokenizerBase, docs: list[Document], answer_weight: float) -> Batch:
    """Tokenize documents, append ``</s>``, pad, and weight the answer token by ``answer_weight``."""
    enc = tokenizer([d.text for d in docs], return_offsets_mapping=True, add_special_tokens=False)
    rows = [ids + [tokenizer.eos_token_id] for ids in enc["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    weights = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, (row, offsets, doc) in enumerate(zip(rows, enc["offset_mapping"], docs)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        weights[i, 1 : len(row)] = 1.0
        for start in doc.answer_starts:
            # The answer token is the one that holds the space before the answer ("Ġblue").
            j = next(t for t, (a, b) in enumerate(offsets) if a <= start - 1 < b)
            weights[i, j] = answer_weight
    return Batch(ids, mask, weights[:, 1:])


def weighted_lm_loss(model: LlamaForCausalLM, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy, weighted per target token and normalised by the total weight."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1), reduction="none")
    w = batch.weights.reshape(-1)
    return (ce * w).sum() / w.sum()


class AnswerProbe:
    """Teacher-forced answer accuracy on held-out prompts: the argmax after ``Answer:`` (one forward pass).

    A cheap proxy for greedy accuracy (the answer is the first generated token), printed during training.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, n: int, device: torch.device) -> None:
        qas = corpus_heldout(n)
        enc = tokenizer([q.prompt for q in qas], add_special_tokens=False)
        self.lengths = torch.tensor([len(x) for x in enc["input_ids"]])
        width = int(self.lengths.max())
        self.ids = torch.full((len(qas), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(enc["input_ids"]):
            self.ids[i, : len(row)] = torch.tensor(row)
        self.mask = (torch.arange(width)[None] < self.lengths[:, None]).long()
        self.targets = torch.tensor([tokenizer(" " + q.answer, add_special_tokens=False).input_ids[0] for q in qas])
        self.kinds = [q.kind for q in qas]
        self.device = device

    @torch.no_grad()
    def __call__(self, model: LlamaForCausalLM) -> dict[str, float]:
        was_training = model.training
        model.eval()
        logits = model(input_ids=self.ids.to(self.device), attention_mask=self.mask.to(self.device)).logits
        pred = logits[torch.arange(len(self.ids)), self.lengths - 1].argmax(-1).cpu()
        model.train(was_training)
        ok = pred == self.targets
        return {f"acc_{k}": float(ok[[i for i, x in enumerate(self.kinds) if x == k]].float().mean()) for k in corpus.KINDS}


def corpus_heldout(n: int) -> list[corpus.QA]:
    """``n`` held-out prompts, an equal share per kind (a seed distinct from the final evaluation's)."""
    from models.llm.tasks import heldout_prompts  # tasks imports torch/transformers only; no cycle at import time

    return heldout_prompts(per_kind=max(1, n // len(corpus.KINDS)), seed=7)


def run_data(opts: StageOptions) -> dict[str, float]:
    """Write ``preview.txt`` (training documents) into the work dir and log the split's sizes."""
    n = 8 if opts.smoke else 64
    rng = random.Random(opts.seed)
    docs = [corpus.training_document(rng) for _ in range(n)]
    out = opts.stage_dir("data") / "preview.txt"
    out.write_text("\n".join(f"--- {d.kind}\n{d.text}" for d in docs), encoding="utf-8")
    train, held = corpus.split_sets("train"), corpus.split_sets("heldout")
    logger.info("object sets: %d train, %d held out; preview of %d documents in %s", len(train), len(held), n, out)
    return {"train_object_sets": float(len(train)), "heldout_object_sets": float(len(held)), "preview": float(n)}


def run_tokenizer(opts: StageOptions) -> dict[str, float]:
    tok = save_tokenizer(opts.out)
    logger.info("tokenizer: %d tokens (%d closed-vocabulary words) -> %s", len(tok), len(corpus.closed_vocabulary()),
                opts.out)
    return {"vocab_size": float(len(tok))}


def run_train(opts: StageOptions) -> dict[str, float]:
    """Train from scratch (or resume) and save ``model.safetensors`` + configs into ``--out``."""
    from models.llm.loader import load_tokenizer

    tok = load_tokenizer(opts.out)
    cfg = opts.extra.get("model_config", LlmModelConfig())
    assert isinstance(cfg, LlmModelConfig)
    answer_weight = float(opts.extra.get("answer_weight", ANSWER_WEIGHT))  # type: ignore[arg-type]
    eval_every = int(opts.extra.get("eval_every", 250))  # type: ignore[arg-type]
    warmup_steps = int(opts.extra.get("curriculum_steps", CURRICULUM_STEPS))  # type: ignore[arg-type]
    model = new_model(cfg, tok, seed=opts.seed).to(opts.device).train()
    logger.info("model: %d parameters, %s", count_parameters(model), cfg)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.98), weight_decay=0.05)
    probe = AnswerProbe(tok, 40 if opts.smoke else PROBE_PROMPTS, opts.device)
    last_probe: dict[str, float] = {}

    def step(i: int) -> dict[str, float]:
        rng = random.Random(opts.seed * 1_000_003 + i)
        max_objects = 1 if i < warmup_steps else corpus.MAX_OBJECTS
        docs = [corpus.training_document(rng, max_objects) for _ in range(opts.batch_size)]
        batch = encode_documents(tok, docs, answer_weight)
        loss = weighted_lm_loss(model, Batch(*(t.to(opts.device) for t in (batch.input_ids, batch.attention_mask,
                                                                              batch.weights))))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if (i + 1) % eval_every == 0 or i + 1 == opts.steps:
            last_probe.update(probe(model))
            logger.info("step %d: loss %.4f, held-out teacher-forced %s", i + 1, loss.item(),
                        {k: round(v, 3) for k, v in last_probe.items()})
        return {"loss": loss.item(), **last_probe}

    stats = run_loop("llm", opts, {"model": model}, optim, step, warmup=100)
    model.cpu().eval()
    model.generation_config = generation_config(tok)
    model.save_pretrained(opts.out)
    stats["parameters"] = float(count_parameters(model))
    (opts.out / "training_config.json").write_text(json.dumps(
        {"model": cfg.to_dict(), "steps": opts.steps, "batch_size": opts.batch_size, "lr": opts.lr,
         "answer_weight": answer_weight, "curriculum_steps": warmup_steps, "seed": opts.seed,
         "doc_mix": corpus.DOC_MIX}, indent=2) + "\n")
    return stats


def run_evaluate(opts: StageOptions) -> dict[str, float]:
    """Held-out greedy accuracy, |h| statistics and fp16 agreement -> ``--out/metrics.json``."""
    from models.llm.evaluate import evaluate_folder

    t0 = time.time()
    metrics = evaluate_folder(Path(opts.out), smoke=opts.smoke)
    metrics["seconds"] = time.time() - t0
    (Path(opts.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    acc = metrics["greedy"]["per_kind_accuracy"]  # type: ignore[index]
    logger.info("held-out greedy accuracy: %s", acc)
    return {f"acc_{k}": float(v) for k, v in acc.items()}  # type: ignore[union-attr]

"""``meg train text``: build the tokenizer and pre-train the CLIP text encoder.

Why pre-train: a randomly initialised text encoder gives the UNet only token identities. We
train it to predict (shape, colour, background) from its pooled (end-of-text) output, so its
hidden states carry the caption's meaning in context; the UNet later uses them frozen, like
SD uses CLIP. Empty captions are included with a uniform target so "" stays uninformative.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from models import components as C
from models.shapes import BACKGROUNDS, COLORS, COMBINATIONS, SHAPES, make_caption
from models.vocab import build_tokenizer
from models.trainer import StageOptions, run_loop

logger = logging.getLogger(__name__)


def run(opts: StageOptions) -> dict[str, float]:
    tok = build_tokenizer(opts.out / C.TOKENIZER)
    encoder = C.new_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    encoder.to(opts.device).train()
    heads = nn.ModuleList(
        [nn.Linear(C.TEXT_HIDDEN, len(SHAPES)), nn.Linear(C.TEXT_HIDDEN, len(COLORS)), nn.Linear(C.TEXT_HIDDEN, len(BACKGROUNDS))]
    ).to(opts.device)
    captions = [make_caption(c, s, b) for c, s, b in COMBINATIONS] + [""]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(opts.device)
    targets = torch.tensor(
        [[SHAPES.index(s), COLORS.index(c), BACKGROUNDS.index(b)] for c, s, b in COMBINATIONS], device=opts.device
    )
    params = list(encoder.parameters()) + list(heads.parameters())
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-4)
    n = len(COMBINATIONS)

    def step(_: int) -> dict[str, float]:
        idx = torch.randint(0, n + 1, (opts.batch_size,), device=opts.device)
        pooled = encoder(ids[idx]).pooler_output
        real = idx < n
        loss = pooled.new_zeros(())
        correct = 0.0
        for k, head in enumerate(heads):
            logits = head(pooled)
            if real.any():
                loss = loss + F.cross_entropy(logits[real], targets[idx[real], k])
                correct += (logits[real].argmax(1) == targets[idx[real], k]).float().mean().item() / 3
            if (~real).any():  # "" -> uniform prediction (maximum entropy)
                loss = loss - 0.1 * F.log_softmax(logits[~real], 1).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return {"loss": loss.item(), "acc": correct}

    stats = run_loop("text", opts, {"encoder": encoder, "heads": heads}, optim, step, warmup=20)
    encoder.cpu().eval().save_pretrained(opts.out / C.TEXT_ENCODER)
    stats["parameters"] = float(C.count_parameters(encoder))
    logger.info("text: %s", stats)
    return stats

"""Offline construction of a tiny CLIP tokenizer for the shapes captions.

Why: Stable Diffusion pipelines expect a ``CLIPTokenizer`` folder (vocab.json + merges.txt),
but the real CLIP vocabulary is a download. The captions use fewer than twenty words, so we
learn byte-pair merges on exactly those words here, which makes every caption word a single
token while unknown words still fall back to single characters.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Final

from transformers import CLIPTokenizer

from models.shapes import BACKGROUNDS, COLORS, SHAPES

BOS_TOKEN: Final[str] = "<|startoftext|>"
EOS_TOKEN: Final[str] = "<|endoftext|>"
MODEL_MAX_LENGTH: Final[int] = 16
_END: Final[str] = "</w>"


def caption_words() -> list[str]:
    """Every word that can occur in a shapes caption, in a stable order."""
    words = ["a", "on", "background", *COLORS, *SHAPES, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Minimal BPE training: merge the most frequent adjacent pair until each word is one symbol.

    Ties are broken by the pair's string so the result is deterministic. Because BPE replays
    merges in learned order, applying these merges reproduces one token per training word.
    """
    return merge_symbols({w: [*w[:-1], w[-1] + _END] for w in words})


def merge_symbols(seqs: dict[str, list[str]]) -> list[tuple[str, str]]:
    """BPE merges of the symbol sequences ``seqs`` (one per word), most frequent adjacent pair first, until
    every word is one symbol; ties break on the pair's text. ``seqs`` is consumed."""
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs.values()):
        counts: Counter[tuple[str, str]] = Counter()
        for s in seqs.values():
            counts.update(zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Vocabulary: lowercase letters (plain and word-final), all merge results, then specials."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [c + _END for c in letters] + [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write vocab.json/merges.txt into ``out_dir`` and save a loadable ``CLIPTokenizer`` there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(caption_words())
    vocab = build_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.save_pretrained(str(out))
    return tokenizer

"""The embedded LLM's tokenizer: byte-level BPE whose merges make every closed-vocabulary word, and each of
the 18 object phrases ``a <colour> <shape>``, one token.

Why this design: a colleague measured that 1-3 M-parameter models with a generic sub-word tokenizer
stayed at chance on colour, shape and yes/no questions for 2,300 steps, and here a word-level vocabulary
(every word one token) still left them at chance after 900 steps of the full mixture and needed
thousands of steps more: answering "what colour is the square?" from words takes three attention hops
(bind each colour to the shape after it, fetch the question's shape, look it up). With each object
phrase a single token the binding lives in the token's embedding and the lookup is two hops, and
scenes are a third shorter. A plain word or phrase vocabulary, though, cannot encode free text:
byte-level BPE (as in GPT-2 / Llama 3) starts from the 256 byte symbols, so any string encodes; the
merges are learned on exactly the closed vocabulary (:func:`models.llm.corpus.closed_vocabulary` and
:func:`object_phrases`, with and without a leading space), so those units are single tokens
(``Ġred``, ``Scene``, ``Ġ3``, ``ĠaĠredĠcircle``) and everything else falls back to smaller pieces or
bytes. The pre-tokenizer is GPT-2's pattern with the object phrases as a first alternative, so "a red
circle" is one piece wherever it occurs and "a redder circle" is not. The merges are learned by a
small deterministic procedure (no trainer, no download).

Special tokens: ``<pad>`` (0), ``<s>`` (1, defined but not added: documents start without it, so the
chat template renders exactly the question text), ``</s>`` (2, ends every training document).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from models.llm.corpus import closed_vocabulary
from models.vocab import merge_symbols
from models.shapes import COLORS, SHAPES

PAD_TOKEN: Final[str] = "<pad>"
BOS_TOKEN: Final[str] = "<s>"
EOS_TOKEN: Final[str] = "</s>"
SPECIAL_TOKENS: Final[tuple[str, ...]] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
MODEL_MAX_LENGTH: Final[int] = 256

#: Chat template (Jinja). A user message holding ``Scene:``/``Question:`` lines is rendered as it is, an
#: assistant message as its ``Answer:`` line, and the generation prompt is ``Answer:``, so
#: ``[{"role": "user", "content": "Scene: ...\nQuestion: ..."}]`` with ``add_generation_prompt=True``
#: becomes exactly ``Scene: ...\nQuestion: ...\nAnswer:``, the format the model was trained on. A user
#: message without those prefixes is taken as a question (``Question: hello``); a system message is
#: context (e.g. the ``Scene:`` line) written on its own line; other roles are written as plain lines.
CHAT_TEMPLATE: Final[str] = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] | trim -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ 'Answer: ' + content + '\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if content.startswith('Scene:') or content.startswith('Question:') -%}"
    "{{ content + '\n' }}"
    "{%- else -%}"
    "{{ 'Question: ' + content + '\n' }}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{ content + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ 'Answer:' }}"
    "{%- endif -%}"
)


def _byte_level(text: str) -> str:
    """``text`` in the byte-to-unicode alphabet of the ByteLevel pre-tokenizer (`` red`` -> ``Ġred``)."""
    return "".join(piece for piece, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merge the most frequent adjacent symbol pair until every word is one symbol.

    Ties break on the pair's text, so the result is deterministic. BPE replays merges by rank, and a
    pair's rank is the step at which it was the best pair, so encoding a training word repeats exactly
    the merges that built it: one token per word.
    """
    return merge_symbols({w: list(w) for w in words})


def object_phrases() -> list[str]:
    """``a <colour> <shape>`` for the 18 objects of the shapes world (each one token, see the module doc)."""
    return [f"a {c} {s}" for c in COLORS for s in SHAPES]


#: GPT-2's pre-tokenization pattern with the object phrases as an extra, first alternative.
PRETOKENIZE_PATTERN: Final[str] = (
    rf" ?a (?:{'|'.join(COLORS)}) (?:{'|'.join(SHAPES)})(?![\p{{L}}\p{{N}}])"
    r"|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)


def vocabulary_words() -> list[str]:
    """Byte-level forms of every closed-vocabulary word and object phrase, bare and after a space
    (``red``, ``Ġred``, ``ĠaĠredĠcircle``)."""
    units = [*closed_vocabulary(), *object_phrases()]
    return list(dict.fromkeys(_byte_level(v) for w in units for v in (w, " " + w)))


def build_backend() -> Tokenizer:
    """The ``tokenizers`` object: specials, the 256 byte symbols, then the learned merges."""
    merges = learn_merges(vocabulary_words())
    alphabet = sorted(ByteLevel.alphabet(), key=lambda ch: _UNICODE_TO_BYTE[ch])
    tokens = [*SPECIAL_TOKENS, *alphabet, *(a + b for a, b in merges)]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


_UNICODE_TO_BYTE: Final[dict[str, int]] = {ch: b for b, ch in _byte_to_unicode().items()}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The transformers tokenizer with the chat template (nothing is written)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=build_backend(),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Build and save the tokenizer into ``out_dir`` (tokenizer.json + tokenizer_config.json holding the
    ``chat_template``, not a separate .jinja file, so the folder reads like a classic checkpoint)."""
    tok = build_tokenizer()
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    return tok

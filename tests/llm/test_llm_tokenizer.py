"""The embedded LLM's tokenizer: one token per closed-vocabulary word, any text encodable, chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from models.llm.corpus import closed_vocabulary
from models.llm.tasks import heldout_prompts
from models.llm.tokenizer import build_tokenizer, learn_merges, save_tokenizer

PROMPT = "Scene: a red circle, a blue square, a green triangle.\nQuestion: what colour is the square?"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llm_tok")
    save_tokenizer(folder)
    return folder


def test_every_closed_vocabulary_word_is_one_token() -> None:
    tok = build_tokenizer()
    for word in closed_vocabulary():
        for form in (word, " " + word):
            assert len(tok(form, add_special_tokens=False).input_ids) == 1, form
    # The evaluated format: one token per word, object phrase or punctuation mark.
    ids = tok("Scene: a red circle, a cyan square.\nQuestion: is there a red square?\nAnswer: no\n").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["Scene", ":", "ĠaĠredĠcircle", ",", "ĠaĠcyanĠsquare", ".", "Ċ",
                                              "Question", ":", "Ġis", "Ġthere", "ĠaĠredĠsquare", "?", "Ċ", "Answer",
                                              ":", "Ġno", "Ċ"]
    ids = tok("the red one is a circle. a redder circle").input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[:7] == ["the", "Ġred", "Ġone", "Ġis", "Ġa", "Ġcircle", "."]
    assert tokens[7:9] == ["Ġa", "Ġred"] and tokens[-1] == "Ġcircle"  # "a redder circle" is no object


@pytest.mark.parametrize("text", ["Héllo wörld! ✓ 42", "日本語のテキスト", "tabs\tand\r\nnewlines", "emoji 🎉🎉", ""])
def test_any_text_round_trips_through_bytes(text: str) -> None:
    tok = build_tokenizer()
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_merges_rebuild_each_word() -> None:
    words = ["Ġred", "Ġgreen", "red", "Ġgrey"]
    merges = learn_merges(words)
    assert learn_merges(words) == merges  # deterministic
    assert len(merges) < sum(len(w) - 1 for w in words)  # shared prefixes merge once


def test_chat_template_renders_the_trained_format(saved: Path) -> None:
    tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    user = [{"role": "user", "content": PROMPT}]
    text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert text == PROMPT + "\nAnswer:"
    ids = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == tok(PROMPT + "\nAnswer:").input_ids
    convo = [*user, {"role": "assistant", "content": "blue"}]
    assert tok.apply_chat_template(convo, tokenize=False) == PROMPT + "\nAnswer: blue\n"
    for qa in heldout_prompts(per_kind=2):  # every evaluated prompt is one user message away
        scene_question = qa.prompt.removesuffix("\nAnswer:")
        rendered = tok.apply_chat_template([{"role": "user", "content": scene_question}], tokenize=False,
                                           add_generation_prompt=True)
        assert rendered == qa.prompt


def test_chat_template_maps_other_messages_to_sensible_lines(saved: Path) -> None:
    tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    messages = [
        {"role": "system", "content": "Scene: a red circle."},
        {"role": "user", "content": "what colour is the circle?"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "Scene: a red circle.\nQuestion: what colour is the circle?\nAnswer:"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "Question: hello\n"


def test_template_is_stored_in_tokenizer_config(saved: Path) -> None:
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert "Answer:" in config["chat_template"]
    assert not (saved / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(saved, local_files_only=True)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("Scene:").input_ids[0] != tok.bos_token_id  # documents start without <s>

"""The shapes-world Q&A corpus: format, held-out split, evaluation set and the accuracy helper.

Answers are re-derived here by parsing the prompt text independently of the generator."""

from __future__ import annotations

import random
import re

import pytest

from models.llm import corpus
from models.llm.tasks import answer_accuracy, heldout_prompts, is_correct
from models.shapes import COLORS, SHAPES

OBJ = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
SCENE_RE = re.compile(rf"^Scene: {OBJ}(?:, {OBJ})?(?:, {OBJ})?\.$")
QUESTION_RES = {
    "colour": re.compile(rf"^Question: what colour is the ({'|'.join(SHAPES)})\?$"),
    "shape": re.compile(rf"^Question: which shape is ({'|'.join(COLORS)})\?$"),
    "count": re.compile(r"^Question: how many shapes are there\?$"),
    "exists": re.compile(rf"^Question: is there a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\?$"),
}


def parse_scene(line: str) -> list[tuple[str, str]]:
    assert SCENE_RE.match(line), line
    return re.findall(OBJ, line)


def expected_answer(prompt: str) -> tuple[str, str]:
    """(kind, answer) computed from the prompt text alone."""
    scene_line, question, answer_tag = prompt.split("\n")
    assert answer_tag == "Answer:"
    objs = parse_scene(scene_line)
    assert len({c for c, _ in objs}) == len(objs) and len({s for _, s in objs}) == len(objs)
    for kind, rx in QUESTION_RES.items():
        m = rx.match(question)
        if m is None:
            continue
        if kind == "colour":
            return kind, next(c for c, s in objs if s == m[1])
        if kind == "shape":
            return kind, next(s for c, s in objs if c == m[1])
        if kind == "count":
            return kind, str(len(objs))
        return kind, "yes" if (m[1], m[2]) in objs else "no"
    raise AssertionError(f"not a canonical question: {question!r}")


def test_split_covers_all_object_sets_and_is_stratified() -> None:
    sets = corpus.all_object_sets()
    assert len(sets) == 18 + 90 + 120 == len(set(sets))
    train, held = corpus.split_sets("train"), corpus.split_sets("heldout")
    assert not set(train) & set(held) and len(train) + len(held) == len(sets)
    for n in (1, 2, 3):
        assert any(len(s) == n for s in held) and any(len(s) == n for s in train)
    assert 0.15 < len(held) / len(sets) < 0.25


def test_training_documents_never_show_a_heldout_scene() -> None:
    rng = random.Random(0)
    kinds = set()
    for _ in range(3000):
        doc = corpus.training_document(rng)
        kinds.add(doc.kind)
        objs = parse_scene(doc.text.split("\n")[0])
        assert frozenset(objs) not in corpus.heldout_sets()
    assert kinds == {*corpus.KINDS, "description", "multi"}


def test_training_answers_are_right_and_weighted() -> None:
    """Every canonical question's answer is what the scene says, and every answer is a weighted target."""
    rng = random.Random(1)
    checked = 0
    for _ in range(1500):
        doc = corpus.training_document(rng)
        lines = doc.text.rstrip("\n").split("\n")
        assert doc.text.endswith("\n") and doc.answer_starts
        if lines[1].startswith("Description: "):
            objs = parse_scene(lines[0])
            for fact in re.findall(r"the (\w+) (?:one )?is a? ?(\w+)\.", lines[1]):
                assert fact in objs or fact[::-1] in objs, (fact, lines)
            continue
        assert len(lines) % 2 == 1 and len(doc.answer_starts) == (len(lines) - 1) // 2
        for q, a, start in zip(lines[1::2], lines[2::2], doc.answer_starts):
            assert a.startswith("Answer: ") and doc.text[start:].startswith(a.removeprefix("Answer: ") + "\n")
            if any(rx.match(q) for rx in QUESTION_RES.values()):
                assert expected_answer(f"{lines[0]}\n{q}\nAnswer:")[1] == a.removeprefix("Answer: ")
                checked += 1
    assert checked > 2000


def test_heldout_prompts_are_balanced_distinct_and_correct() -> None:
    prompts = heldout_prompts()
    assert len(prompts) >= 400 and len({q.prompt for q in prompts}) == len(prompts)
    by_kind = {k: [q for q in prompts if q.kind == k] for k in corpus.KINDS}
    assert {len(v) for v in by_kind.values()} == {len(prompts) // 4}
    answers = [q.answer for q in by_kind["exists"]]
    assert answers.count("yes") == answers.count("no")
    assert sum(q.hard_negative for q in by_kind["exists"]) >= len(answers) // 8
    assert {q.answer for q in by_kind["count"]} == {"1", "2", "3"}
    for q in prompts:
        assert q.text == f"{q.prompt} {q.answer}\n"
        assert expected_answer(q.prompt) == (q.kind, q.answer)
        assert corpus.is_heldout(q.scene)
    assert heldout_prompts() == prompts  # deterministic


def test_answer_accuracy_scores_exact_first_lines() -> None:
    prompts = heldout_prompts(per_kind=10)
    truth = {q.prompt: q.answer for q in prompts}
    perfect = answer_accuracy(lambda p: f" {truth[p]}\nQuestion: more", prompts)
    assert perfect.overall == 1.0 and set(perfect.per_kind) == set(corpus.KINDS) and perfect.n == 40
    no_space = answer_accuracy(lambda p: f"{truth[p]}\n", prompts)
    assert no_space.overall == 0.0 and len(no_space.failures) == 40
    always_yes = answer_accuracy(lambda p: " yes\n", prompts)
    assert always_yes.per_kind["exists"] == 0.5 and always_yes.per_kind["colour"] == 0.0
    assert is_correct(" blue", "blue") and not is_correct(" blue green\n", "blue") and not is_correct(" Blue\n", "blue")
    with pytest.raises(ValueError):
        answer_accuracy(lambda p: "", [])

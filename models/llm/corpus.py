"""Procedural question-answering corpus about the shapes world (the image model's colours and shapes).

Why procedural: like the image family, the embedded language model must be retrainable from scratch
without any download, and its answers must be checkable automatically. Every document is a pure
function of a seed.

The format (one line each, answer after ``Answer:`` with one leading space, then a newline)::

    Scene: a red circle, a blue square, a green triangle.
    Question: what colour is the square?
    Answer: blue

Scenes hold 1-3 objects ``a <colour> <shape>``, no colour and no shape twice, joined by ``, `` and ended
by ``.``. The four question kinds of the evaluation are :data:`KINDS`. The training corpus also holds a
few other phrasings and scene descriptions, so that free prompts continue with sensible text.

Held-out split: scenes are split by their *set* of objects (order ignored), so no permutation of a
held-out scene is ever seen in training (:func:`is_heldout`).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from models.shapes import COLORS, SHAPES

#: One object of a scene: (colour, shape).
Obj = tuple[str, str]
#: A scene: its objects in the order they are written.
Scene = tuple[Obj, ...]

#: The four evaluated question kinds.
KINDS: Final[tuple[str, ...]] = ("colour", "shape", "count", "exists")
MAX_OBJECTS: Final[int] = 3
#: Fraction of the object sets of each size that training never sees.
HELDOUT_FRACTION: Final[float] = 0.2
#: Seed of the (fixed) held-out split; changing it changes which scenes are held out.
SPLIT_SEED: Final[int] = 12
NUMBER_WORDS: Final[dict[int, str]] = {1: "one", 2: "two", 3: "three"}

#: Mixture of training documents (probabilities): canonical questions dominate; the rest is variety.
DOC_MIX: Final[dict[str, float]] = {"canonical": 0.78, "paraphrase": 0.07, "description": 0.15}


@dataclass(frozen=True)
class QA:
    """One question about one scene, with its expected answer."""

    scene: Scene
    kind: str  # one of KINDS (paraphrases use the kind they paraphrase)
    question: str
    answer: str
    hard_negative: bool = False  # an `exists` question whose colour and shape are both in the scene

    @property
    def prompt(self) -> str:
        """The text the model is given: scene and question lines, then ``Answer:`` (no space)."""
        return f"{scene_text(self.scene)}\nQuestion: {self.question}\nAnswer:"

    @property
    def completion(self) -> str:
        """What a correct model continues with: one space, the answer, a newline."""
        return f" {self.answer}\n"

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def scene_text(scene: Scene) -> str:
    """``Scene: a red circle, a blue square.``"""
    return "Scene: " + ", ".join(f"a {c} {s}" for c, s in scene) + "."


def canonical(scene: Scene) -> frozenset[Obj]:
    """The object set of a scene (order ignored): the unit of the held-out split."""
    return frozenset(scene)


@lru_cache(maxsize=1)
def all_object_sets() -> tuple[frozenset[Obj], ...]:
    """Every valid object set (no colour or shape twice), sorted deterministically: 18 + 90 + 120 = 228."""
    sets: list[frozenset[Obj]] = []
    for n in range(1, MAX_OBJECTS + 1):
        for shapes in itertools.combinations(SHAPES, n):
            for colours in itertools.permutations(COLORS, n):
                sets.append(frozenset(zip(colours, shapes)))
    return tuple(sorted(sets, key=lambda s: (len(s), sorted(s))))


@lru_cache(maxsize=1)
def heldout_sets() -> frozenset[frozenset[Obj]]:
    """The held-out object sets: a seeded :data:`HELDOUT_FRACTION` of each size (stratified, so every
    scene size is evaluated)."""
    rng = random.Random(SPLIT_SEED)
    held: set[frozenset[Obj]] = set()
    for n in range(1, MAX_OBJECTS + 1):
        group = [s for s in all_object_sets() if len(s) == n]
        rng.shuffle(group)
        held.update(group[: max(1, round(HELDOUT_FRACTION * len(group)))])
    return frozenset(held)


def is_heldout(scene: Scene) -> bool:
    return canonical(scene) in heldout_sets()


def split_sets(split: str) -> list[frozenset[Obj]]:
    """Object sets of ``"train"`` or ``"heldout"``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    held = heldout_sets()
    return [s for s in all_object_sets() if (s in held) == (split == "heldout")]


def random_scene(rng: random.Random, split: str = "train", max_objects: int = MAX_OBJECTS) -> Scene:
    """A scene from ``split``: object count uniform in 1..max_objects, then a set of that size, then an order."""
    n = rng.randint(1, max_objects)
    group = [s for s in _sets_by_size(split) if len(s) == n]
    objs = sorted(rng.choice(group))
    rng.shuffle(objs)
    return tuple(objs)


@lru_cache(maxsize=2)
def _sets_by_size(split: str) -> tuple[frozenset[Obj], ...]:
    return tuple(split_sets(split))


def _absent_pair(scene: Scene, rng: random.Random, hard: bool) -> Obj | None:
    """An object not in the scene; ``hard``: its colour and its shape both occur in the scene (on other
    objects), so only the binding tells it apart. None when no such object exists (one-object scenes)."""
    present = set(scene)
    if hard:
        colours, shapes = {c for c, _ in scene}, {s for _, s in scene}
        pool = [(c, s) for c in sorted(colours) for s in sorted(shapes) if (c, s) not in present]
    else:
        pool = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    return rng.choice(pool) if pool else None


def make_qa(scene: Scene, kind: str, rng: random.Random, answer_yes: bool | None = None) -> QA:
    """A canonical question of ``kind`` about ``scene``. For ``exists``, ``answer_yes`` fixes the answer
    (None: a fair coin); half of the "no" questions are hard negatives when the scene allows one."""
    if kind == "colour":
        colour, shape = rng.choice(scene)
        return QA(scene, kind, f"what colour is the {shape}?", colour)
    if kind == "shape":
        colour, shape = rng.choice(scene)
        return QA(scene, kind, f"which shape is {colour}?", shape)
    if kind == "count":
        return QA(scene, kind, "how many shapes are there?", str(len(scene)))
    if kind == "exists":
        yes = rng.random() < 0.5 if answer_yes is None else answer_yes
        if yes:
            colour, shape = rng.choice(scene)
            return QA(scene, kind, f"is there a {colour} {shape}?", "yes")
        hard = rng.random() < 0.5
        pair = _absent_pair(scene, rng, hard) or _absent_pair(scene, rng, False)
        assert pair is not None  # at most 3 of the 18 objects are present
        hard = pair[0] in {c for c, _ in scene} and pair[1] in {s for _, s in scene}
        return QA(scene, kind, f"is there a {pair[0]} {pair[1]}?", "no", hard_negative=hard)
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def make_paraphrase(scene: Scene, rng: random.Random) -> QA:
    """Other phrasings of the four questions (training variety only; never evaluated)."""
    kind = rng.choice(KINDS)
    colour, shape = rng.choice(scene)
    if kind == "colour":
        return QA(scene, kind, f"what is the colour of the {shape}?", colour)
    if kind == "shape":
        return QA(scene, kind, f"what shape is the {colour} one?", shape)
    if kind == "count":
        return QA(scene, kind, "how many objects are in the scene?", str(len(scene)))
    if rng.random() < 0.5:
        return QA(scene, kind, f"is the {shape} {colour}?", "yes")
    other = rng.choice([c for c in COLORS if c != colour])
    return QA(scene, kind, f"is the {shape} {other}?", "no")


def describe(scene: Scene, rng: random.Random) -> tuple[str, list[int]]:
    """``Description: there are two shapes. the square is blue. the red one is a circle.`` and the offsets
    (in the returned line) of the words that must be looked up in the scene: the count and every colour or
    shape after ``is``. Facts come in random order and direction, so they are lookups, not a copy of the
    scene line."""
    n = len(scene)
    text = "Description: " + ("there is one shape." if n == 1 else f"there are {NUMBER_WORDS[n]} shapes.")
    targets = [len("Description: there is ") if n == 1 else len("Description: there are ")]
    for c, s in rng.sample(list(scene), n):
        lead, word = (f" the {s} is ", c) if rng.random() < 0.5 else (f" the {c} one is a ", s)
        targets.append(len(text) + len(lead))
        text += f"{lead}{word}."
    return text, targets


@dataclass(frozen=True)
class Document:
    """One training document: its text and the character offsets of the words the loss weighs as answers
    (the first character of the word, after its space)."""

    text: str
    answer_starts: tuple[int, ...]
    kind: str


#: Questions per question document: 1-4, so the loss sees several lookups per scene (more supervised
#: answers per step) while one-question documents keep the evaluated shape (answer line, then ``</s>``).
MAX_QUESTIONS: Final[int] = 4


def training_document(rng: random.Random, max_objects: int = MAX_OBJECTS) -> Document:
    """A document drawn from the training mixture (:data:`DOC_MIX`) over training scenes only.

    ``max_objects`` < 3 is the warm-up curriculum: with one object per scene every question is answered by
    copying the one colour or shape in context, which a fresh model learns in ~150 steps; that copying
    is the first half of every lookup, and with it in place the binding of colours to shapes is learnt
    far sooner than from the full mixture (measured: no copying at all after 900 steps without it).
    """
    scene = random_scene(rng, "train", max_objects)
    head = scene_text(scene) + "\n"
    if rng.random() >= DOC_MIX["canonical"] + DOC_MIX["paraphrase"]:
        line, offsets = describe(scene, rng)
        return Document(f"{head}{line}\n", tuple(len(head) + o for o in offsets), "description")
    text, starts, kinds, asked = head, [], [], set()
    for _ in range(rng.randint(1, MAX_QUESTIONS)):
        paraphrase = rng.random() < DOC_MIX["paraphrase"] / (DOC_MIX["canonical"] + DOC_MIX["paraphrase"])
        qa = make_paraphrase(scene, rng) if paraphrase else make_qa(scene, rng.choice(KINDS), rng)
        if qa.question in asked:
            continue
        asked.add(qa.question)
        text += f"Question: {qa.question}\nAnswer:"
        starts.append(len(text) + 1)
        kinds.append(qa.kind)
        text += qa.completion
    return Document(text, tuple(starts), kinds[0] if len(kinds) == 1 else "multi")


def closed_vocabulary() -> list[str]:
    """Every word the corpus can produce, in a stable order (each becomes one token)."""
    words = [
        "Scene", "Question", "Answer", "Description", "User", "System", "Assistant",
        "a", "an", "the", "what", "which", "how", "many", "is", "are", "there", "in", "of", "one",
        "colour", "color", "shape", "shapes", "object", "objects", "scene", "and", "yes", "no",
        "two", "three", "none", "hello", "I", "it", "this", "that", "not", "know",
        *COLORS, *SHAPES, *(str(d) for d in range(10)),
    ]
    return list(dict.fromkeys(words))

"""The language-model half of the testbed: an embedded tiny Llama trained on the shapes world, a loader for
real Llama-family checkpoints, and the edge/device split of a decoder (:mod:`models.llm.split`).

Modules: :mod:`~models.llm.corpus` (procedural Q&A corpus and held-out split), :mod:`~models.llm.tokenizer`,
:mod:`~models.llm.model`, :mod:`~models.llm.loader` (``load_llm``), :mod:`~models.llm.split`
(``EdgeHalf``, ``DeviceHalf``, ``sample``), :mod:`~models.llm.tasks` (held-out prompts and
``answer_accuracy``), :mod:`~models.llm.train` (``meg train llm``).
"""

from pathlib import Path

#: Folder holding the committed embedded LLM.
DEFAULT_LLM_DIR: Path = Path(__file__).resolve().parent.parent / "shapes_llm_v1"

__all__ = ["DEFAULT_LLM_DIR"]

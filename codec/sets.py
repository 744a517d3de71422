"""Codec sets: the fitted data (ranges, centres, learned weights) a codec needs for one feature source.

A feature source is (model, split point). Its codec set is a folder beside the model's own components,
``<model dir>/codecs/<source>-k<k>/``, holding a ``config.json`` (source, model, split, content hash) and the
arrays. The stream header names the set the edge coded with (id and hash); a device whose set differs refuses
the payload cleanly instead of decoding garbage.
"""

from __future__ import annotations

import json
from pathlib import Path

#: The feature source of a language model's hidden states (the residual stream after layer k - 1).
LLM_SOURCE = "llm-hidden"
#: The feature source of the diffusion model's latents.
IMAGE_SOURCE = "image"
SOURCES = (IMAGE_SOURCE, LLM_SOURCE)


def codec_set_dir(model_dir: Path, split_layer: int, source: str = LLM_SOURCE) -> Path:
    """Where the codec set of ``source`` at ``split_layer`` lives for the model in ``model_dir``."""
    return Path(model_dir) / "codecs" / f"{source}-k{split_layer}"


def codec_set_identity(set_dir: Path, model_id: str, split_layer: int, source: str = LLM_SOURCE
                       ) -> tuple[str, str]:
    """(id, content hash) of the codec set in ``set_dir``; the hash is "" when the set has not been fitted
    (only codecs that need no fitted data can be used then)."""
    name = f"{model_id}/{source}-k{split_layer}"
    config = Path(set_dir) / "config.json"
    if not config.is_file():
        return name, ""
    try:
        return name, str(json.loads(config.read_text(encoding="utf-8")).get("content_hash", ""))
    except (OSError, ValueError):
        return name, ""

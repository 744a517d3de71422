"""Codec sets: the fitted data (ranges, centres, learned weights) a codec needs for one feature source.

A feature source is (model, split point). Its codec set is a folder beside the model's own components,
``<model dir>/codecs/<source>-k<k>/``, holding a ``config.json`` (source, model, split, content hash) and the
arrays. The stream header names the set the edge coded with (id and hash); a device whose set differs refuses
the payload cleanly instead of decoding garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: The feature source of a language model's hidden states (the residual stream after layer k - 1).
LLM_SOURCE = "llm-hidden"
#: The feature source of the diffusion model's latents.
IMAGE_SOURCE = "image"
SOURCES = (IMAGE_SOURCE, LLM_SOURCE)
#: The split point of the image source: 0 = the final latent the edge sends (the whole denoising ran there).
IMAGE_SPLIT = 0
#: Every set's description file: source, model, split, the SHA-256 of each file and the content hash.
CONFIG_FILE = "config.json"


def file_sha256(path: Path) -> str:
    """SHA-256 of one file of a set (what config.json records for it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def content_hash(file_hashes: dict[str, str]) -> str:
    """One hash over a set's files (name and SHA-256 of each, sorted): what the stream header names, so two
    sets with the same files have the same hash wherever their folders are."""
    joined = "\n".join(f"{name}:{digest}" for name, digest in sorted(file_hashes.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


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

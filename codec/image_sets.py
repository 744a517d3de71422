"""The image codec set: the fitted data of the latent codecs, kept beside the model they were fitted on.

Why a set per model: FCM ranges, DT-UFC centres, learned CompressAI coders and the JSCC links are all fitted on
one model's latents; a set fitted on another model decodes into garbage without any error. So the set lives in
``<model dir>/codecs/image-k0/`` (:func:`codec.sets.codec_set_dir` with source ``image`` and split 0, the final
latent the edge sends), the edge and the device each open the set of the model they run, and the edge names
its set (id and content hash) in the stream header for the device to compare.

A set folder holds ``config.json`` (source, model id, split, set name, how it was made, the SHA-256 of every
file and a content hash over them) and the files the codecs read, unchanged in name and format:

* ``fcm_<set>.json``: FCM truncation range; ``dtufc_<set>.safetensors``: DT-UFC centres;
* ``learned_<set>.safetensors`` / ``learned_<set>.json``: the learned coders and their configs;
* ``jscc_<name>.safetensors``: the JSCC links (``jscc_full``, ``jscc_e2e``).

``<set>`` defaults to the set name in config.json (``shapes_v1`` for the embedded model), so header params
that name a set (``fcm_stats``, ``dtufc_centres``, ``learned_set``) keep working. Files are found inside the set
folder only and must be listed (with their hash) in config.json: a header can select a file, never a path.

Sets are made by ``meg train codecs --source image --model-dir DIR`` (:mod:`codec.fit_image`), or adopted
from a folder of the old global ``codec/weights`` layout with ``--adopt OLD_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from codec.base import CodecError
from codec.sets import CONFIG_FILE, IMAGE_SOURCE, IMAGE_SPLIT, codec_set_dir, content_hash, file_sha256

log = logging.getLogger(__name__)

#: What a set's codec files look like (``config.json`` aside); adopting copies exactly these.
SET_FILE_PATTERNS: tuple[str, ...] = ("fcm_*.json", "dtufc_*.safetensors", "dtufcclip_*.safetensors",
                                      "learned_*.safetensors",
                                      "learned_*.json", "jscc_*.safetensors", "adaptation.json")
FIT_COMMAND = "meg train codecs --source image --model-dir {model_dir}"
ADOPT_COMMAND = "meg train codecs --source image --model-dir {model_dir} --adopt {old_dir}"


def image_set_dir(model_dir: Path | str) -> Path:
    """``<model dir>/codecs/image-k0``: where the image codec set of the model in ``model_dir`` lives."""
    return codec_set_dir(Path(model_dir), IMAGE_SPLIT, IMAGE_SOURCE)


def set_files(folder: Path) -> list[Path]:
    """The codec files in ``folder`` (sorted; ``config.json`` and anything else excluded)."""
    found = {p for pattern in SET_FILE_PATTERNS for p in Path(folder).glob(pattern) if p.is_file()}
    return sorted(found)


def _model_dir_hint(folder: Path) -> str:
    """The model folder a set folder belongs to, for the commands an error message suggests."""
    folder = Path(folder)
    return str(folder.parent.parent) if folder.parent.name == "codecs" else "<model dir>"


def fit_command(folder: Path | None) -> str:
    return FIT_COMMAND.format(model_dir=_model_dir_hint(folder) if folder is not None else "<model dir>")


@dataclass(frozen=True)
class ImageSet:
    """A checked set: its folder and config.json."""

    folder: Path
    config: dict[str, Any]

    @property
    def set_name(self) -> str:
        return str(self.config.get("set_name", ""))

    @property
    def files(self) -> dict[str, str]:
        return dict(self.config.get("files", {}))


def require_image_set(weights_dir: Path | None) -> ImageSet:
    """The image codec set in ``weights_dir``, checked against its config.json; :class:`CodecError` saying which
    command makes it when there is none, or how to convert a folder of the old ``codec/weights`` layout."""
    if weights_dir is None:
        raise CodecError("this codec needs the model's fitted image codec set (<model dir>/codecs/image-k0) and "
                         f"none was given; make it with `{fit_command(None)}`")
    folder = Path(weights_dir)
    if not (folder / CONFIG_FILE).is_file():
        if folder.is_dir() and set_files(folder):
            raise CodecError(
                f"{folder} holds image codec files but no {CONFIG_FILE}: it is a folder of the old global "
                f"codec/weights layout. Convert it into the model's codec set with "
                f"`{ADOPT_COMMAND.format(model_dir='<model dir>', old_dir=folder)}`")
        raise CodecError(f"no image codec set at {folder}: this codec needs data fitted on the model's latents; "
                         f"make the set with `{fit_command(folder)}` (raw-fp16, raw-fp32, uint8 and analog "
                         f"codecs need no set)")
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file())
    return _checked_set(folder.resolve(), stamp)


@lru_cache(maxsize=16)
def _checked_set(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> ImageSet:
    """Read and verify once per folder state (the stamp is the cache key: a refitted folder is read again)."""
    del stamp
    redo = f"make it again with `{fit_command(folder)}`"
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        files: dict[str, str] = dict(config["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"image codec set {folder}: {CONFIG_FILE} is unreadable ({exc}); {redo}") from exc
    if config.get("source") != IMAGE_SOURCE:
        raise CodecError(f"codec set {folder} is for source {config.get('source')!r}, not {IMAGE_SOURCE!r}")
    for name, digest in files.items():
        path = folder / name
        if path.parent != folder or not path.is_file() or file_sha256(path) != digest:
            raise CodecError(f"image codec set {folder}: {name} is missing or does not match {CONFIG_FILE}'s "
                             f"hash; {redo}")
    if config.get("content_hash") != content_hash(files):
        raise CodecError(f"image codec set {folder}: content_hash does not match its files; {redo}")
    return ImageSet(folder, config)


def default_set_name(weights_dir: Path | None) -> str:
    """The set name files are stored under (``fcm_<name>.json`` ...) when a header names none."""
    name = require_image_set(weights_dir).set_name
    if not name:
        raise CodecError(f"image codec set {weights_dir}: {CONFIG_FILE} names no set_name; "
                         f"make it again with `{fit_command(weights_dir)}`")
    return name


def resolve_set_file(weights_dir: Path | None, file_name: str) -> Path:
    """``file_name`` inside the checked set (it must be one of config.json's files), else :class:`CodecError`."""
    image_set = require_image_set(weights_dir)
    candidate = (image_set.folder / file_name).resolve()
    if candidate.parent != image_set.folder or file_name not in image_set.files:
        raise CodecError(f"no {file_name} in the image codec set {image_set.folder} "
                         f"(it holds {', '.join(sorted(image_set.files)) or 'nothing'})")
    return candidate


# ----------------------------------------------------------------------------------- writing a set


def image_model_id(model_dir: Path) -> str:
    """The model folder's name and a hash of its VAE and denoiser weights: the latents a set is fitted on
    depend on exactly those, so a retrained model is told apart from its set's model."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for sub in ("vae", "unet", "transformer"):
        for path in sorted((model_dir / sub).glob("*.safetensors")):
            with path.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
    return f"{model_dir.resolve().name}@sha256:{digest.hexdigest()[:16]}"


def _parts(folder: Path, files: list[Path]) -> dict[str, list[str]]:
    """What the set holds, for people and ``GET /v1/sources``: FCM/DT-UFC set names, coders, JSCC links."""
    parts: dict[str, list[str]] = {"fcm": [], "dtufc": [], "learned": [], "jscc": []}
    for path in files:
        name = path.name
        if name.startswith("fcm_"):
            parts["fcm"].append(name[4:-5])
        elif name.startswith("dtufc_"):
            parts["dtufc"].append(name[6:-12])
        elif name.startswith("dtufcclip_"):
            parts["dtufc"].append("clip:" + name[10:-12])
        elif name.startswith("jscc_"):
            parts["jscc"].append(name[:-12])
        elif name.startswith("learned_") and name.endswith(".json"):
            try:
                parts["learned"] += sorted(json.loads(path.read_text()).get("models", {}))
            except (OSError, ValueError):
                log.warning("%s is unreadable; its coders are not listed", path)
    return parts


def infer_set_name(files: list[Path]) -> str:
    """The ``<set>`` most of the FCM / DT-UFC / learned files are stored under (the JSCC files have none)."""
    names = Counter(p.name.split("_", 1)[1].rsplit(".", 1)[0] for p in files
                    if p.name.startswith(("fcm_", "dtufc_", "learned_")))
    if not names:
        raise ValueError("no fcm_/dtufc_/learned_ files to take a set name from")
    return names.most_common(1)[0][0]


def write_image_set_config(folder: Path, model_dir: Path, made_by: dict[str, Any], set_name: str | None = None,
                           model_id: str | None = None) -> dict[str, Any]:
    """Hash the codec files in ``folder`` and write its ``config.json`` (returned): what makes a folder a set."""
    folder = Path(folder)
    files = set_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no codec files ({', '.join(SET_FILE_PATTERNS)})")
    hashes = {p.name: file_sha256(p) for p in files}
    config = {
        "source": IMAGE_SOURCE,
        "model_id": model_id or image_model_id(model_dir),
        "split": IMAGE_SPLIT,
        "set_name": set_name or infer_set_name(files),
        "parts": _parts(folder, files),
        "made_by": made_by,
        "files": hashes,
        "content_hash": content_hash(hashes),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %s (content hash %s)", folder / CONFIG_FILE, config["content_hash"][:16])
    return config


def adopt_image_set(old_dir: Path, model_dir: Path, note: str = "") -> Path:
    """Copy the codec files of an old-layout folder (``codec/weights``) into the model's set and write its
    config.json; nothing is refitted, and ``made_by`` says so. Returns the set folder."""
    old_dir, out = Path(old_dir), image_set_dir(model_dir)
    files = set_files(old_dir)
    if not files:
        raise ValueError(f"{old_dir} holds no codec files to adopt ({', '.join(SET_FILE_PATTERNS)})")
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.resolve() != (out / path.name).resolve():
            shutil.copy2(path, out / path.name)
    made_by = {"method": "adopted",
               "from": str(old_dir),
               "note": note or "files fitted/trained earlier, copied in unchanged; not refitted",
               "command": ADOPT_COMMAND.format(model_dir=model_dir, old_dir=old_dir)}
    write_image_set_config(out, model_dir, made_by)
    return out


def refresh_image_set_config(folder: Path, model_dir: Path, part: str, how: dict[str, Any],
                             set_name: str | None = None) -> dict[str, Any]:
    """Re-hash ``folder`` after one part (``fcm``, ``learned``, ``jscc_full`` ...) was (re)made, keeping what
    the previous config.json said about the other parts; ``made_by["parts"][part]`` records ``how``."""
    folder = Path(folder)
    previous: dict[str, Any] = {}
    if (folder / CONFIG_FILE).is_file():
        try:
            previous = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("%s is unreadable; writing a fresh one", folder / CONFIG_FILE)
    made_by = dict(previous.get("made_by", {}))
    made_by["parts"] = {**made_by.get("parts", {}), part: how}
    name = set_name or previous.get("set_name") or sanitize_set_name(Path(model_dir).resolve().name)
    return write_image_set_config(folder, model_dir, made_by, set_name=name)


def sanitize_set_name(name: str) -> str:
    """A model folder name as a set name (``fcm_<name>.json``): letters, digits, ``_``, ``-``, ``.`` only."""
    cleaned = "".join(c if c.isalnum() or c in "_-." else "_" for c in name).strip("._-")[:64]
    return cleaned or "model"

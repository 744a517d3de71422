"""Fitted codec sets for LLM hidden states, and the two codecs that use them: ``fcm-hidden``, ``dtufc-hidden``.

A *codec set* is a folder fitted once per (model, split layer) by ``meg train codecs --source llm-hidden
--model-dir DIR --split-layer K`` (:mod:`codec.fit_hidden`), by convention ``<model dir>/codecs/llm-hidden-k<K>``,
which the edge and the device pass as the codec's ``weights_dir``. It holds ``config.json`` (source, model id,
split layer, codecs, the SHA-256 of every file and a content hash over them) and safetensors arrays. The file
names are fixed here, never read from a header, so a request cannot make the device open another file. The
edge writes the set's content hash into the header (``llm_set``) and the device refuses a payload coded with
another set: both ends must hold the same ranges, centres and tables.

``fcmq`` (terminal; preset ``fcm-hidden``)
    FCM: clip to the fitted range ``[lo, hi]`` (0.1 / 99.9 percentiles of the training hidden states), min–max
    uniform quantisation to ``fcm_bits`` bits, then rANS with the fitted frequency table of those codes.
``dtufcq`` (terminal; preset ``dtufc-hidden``)
    DT-UFC: the peaky-to-balanced transform, value → index of the nearest of ``dtufc_k`` 1-D K-means centres
    fitted on the hidden states (256 by default; 64, 16 and 8 are fitted too), the indices rANS-coded with
    the fitted frequency table; the device looks the centres up.

Both entropy coders use one fixed table per set, so a decode step (one row of ``d`` values) carries no
per-request side information at all: the payload is the rANS stream, and that is the rate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from compressai._CXX import pmf_to_quantized_cdf
from compressai.ans import RansDecoder, RansEncoder
from safetensors.torch import load_file

from codec.base import CodecError, SourceCoder, StageContext, TensorInfo
from codec.hidden_quant import as_rows, info_rows
from codec.primitives import int_param
from codec.registry import register_preset, register_terminal
from codec.sets import CONFIG_FILE, LLM_SOURCE, content_hash, file_sha256

log = logging.getLogger(__name__)

FCM_FILE = "fcm.safetensors"
DTUFC_FILE = "dtufc.safetensors"
JSCC_FILE = "jscc-hidden.safetensors"
SET_PARAM = "llm_set"
FIT_COMMAND = "meg train codecs --source llm-hidden --model-dir <llm model dir> --split-layer <k>"
#: Bits of the rANS tables' integer CDFs.
CDF_PRECISION = 16
FCM_BITS = (2, 3, 4, 5, 6, 8)
DTUFC_K = (256, 64, 16, 8)


@dataclass(frozen=True)
class CodecSet:
    """A loaded set: its folder, config and the tensors of each file."""

    folder: Path
    config: dict[str, object]
    arrays: dict[str, dict[str, torch.Tensor]]

    @property
    def short_hash(self) -> str:
        return str(self.config["content_hash"])[:16]

    def array(self, file: str, key: str) -> torch.Tensor:
        try:
            return self.arrays[file][key]
        except KeyError as exc:
            raise CodecError(f"codec set {self.folder} lacks {file}:{key}; refit it with `{FIT_COMMAND}`") from exc


def load_codec_set(weights_dir: Path | None, needs: str) -> CodecSet:
    """The fitted set in ``weights_dir`` holding file ``needs``; :class:`CodecError` saying how to make it when
    the folder or file is missing, or how to refit when it is corrupt."""
    if weights_dir is None:
        raise CodecError(f"llm-hidden codec set missing: no weights folder given (the edge and device pass "
                         f"<llm model dir>/codecs/llm-hidden-k<k>); make it with `{FIT_COMMAND}`")
    folder = Path(weights_dir)
    config_path, file_path = folder / CONFIG_FILE, folder / needs
    if not config_path.is_file() or not file_path.is_file():
        missing = config_path if not config_path.is_file() else file_path
        raise CodecError(f"llm-hidden codec set missing: {missing} does not exist; make it with `{FIT_COMMAND}`")
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file())
    return _load_codec_set(folder.resolve(), stamp)


@lru_cache(maxsize=8)
def _load_codec_set(folder: Path, stamp: tuple[tuple[str, int, int], ...]) -> CodecSet:
    del stamp  # part of the cache key only: a refitted folder is read again
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        files: dict[str, str] = dict(config["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"codec set {folder}: {CONFIG_FILE} is unreadable ({exc}); "
                         f"refit with `{FIT_COMMAND}`") from exc
    if config.get("source") != LLM_SOURCE:
        raise CodecError(f"codec set {folder} is for source {config.get('source')!r}, not {LLM_SOURCE!r}")
    arrays: dict[str, dict[str, torch.Tensor]] = {}
    for name, digest in files.items():
        path = folder / name
        if path.parent != folder or not path.is_file() or file_sha256(path) != digest:
            raise CodecError(f"codec set {folder}: {name} is missing or does not match config.json's hash; "
                             f"refit with `{FIT_COMMAND}`")
        try:
            arrays[name] = load_file(str(path))
        except Exception as exc:  # safetensors raises several types on a damaged file
            raise CodecError(f"codec set {folder}: {name} is unreadable ({exc})") from exc
    if config.get("content_hash") != content_hash(files):
        raise CodecError(f"codec set {folder}: content_hash does not match its files; refit with `{FIT_COMMAND}`")
    return CodecSet(folder, config, arrays)


def stamp_and_check_set(codec_set: CodecSet, ctx: StageContext, encoding: bool) -> None:
    """Edge: write the set's hash into the header. Device: refuse a payload coded with another set."""
    if encoding:
        ctx.params[SET_PARAM] = codec_set.short_hash
    elif ctx.params.get(SET_PARAM) != codec_set.short_hash:
        raise CodecError(f"payload was coded with codec set {ctx.params.get(SET_PARAM)!r}, this device holds "
                         f"{codec_set.short_hash!r} ({codec_set.folder}): edge and device need the same set")


class FrequencyTable:
    """rANS with fixed, fitted symbol frequencies: ``counts (G, L)``, one table per group of values.

    Why fixed: the table is part of the fitted set, so nothing about the distribution travels per request.
    Every symbol gets a nonzero frequency (add-half smoothing), so any code in ``[0, L)`` is encodable.
    """

    def __init__(self, counts: torch.Tensor) -> None:
        counts = counts.double().reshape(counts.shape[0] if counts.dim() > 1 else 1, -1)
        if not torch.isfinite(counts).all() or (counts < 0).any():
            raise CodecError("frequency table holds negative or non-finite counts")
        self.groups, self.levels = int(counts.shape[0]), int(counts.shape[1])
        pmfs = (counts + 0.5) / (counts + 0.5).sum(dim=1, keepdim=True)
        self.cdfs = [pmf_to_quantized_cdf(p.tolist() + [0.0], CDF_PRECISION) for p in pmfs]
        self.lengths = [self.levels + 2] * self.groups
        self.offsets = [0] * self.groups

    def _indexes(self, n: int, d: int) -> list[int]:
        if self.groups == 1:
            return [0] * n
        if d != self.groups:
            raise CodecError(f"frequency table has {self.groups} per-dimension groups; rows have {d} values")
        return np.tile(np.arange(d), n // d).tolist()

    def encode(self, codes: np.ndarray, d: int) -> bytes:
        return RansEncoder().encode_with_indexes(codes.reshape(-1).astype(np.int32).tolist(),
                                                 self._indexes(codes.size, d), self.cdfs, self.lengths, self.offsets)

    def decode(self, stream: bytes, n: int, d: int) -> np.ndarray:
        # Pad with zero words: a damaged stream must never make the decoder read past its buffer.
        padded = stream + bytes(4 * n + 16)
        try:
            codes = np.asarray(RansDecoder().decode_with_indexes(padded, self._indexes(n, d), self.cdfs,
                                                                 self.lengths, self.offsets), dtype=np.int64)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"rANS stream does not decode: {exc}") from exc
        if codes.size != n or (codes < 0).any() or (codes >= self.levels).any():
            raise CodecError("rANS stream decodes to codes outside the table (corrupt payload)")
        return codes


class _TableCoder(SourceCoder):
    """Shared body of the fitted quantise-then-rANS terminals: one rANS stream of all tensors' codes."""

    def __init__(self, codec_set: CodecSet, table: FrequencyTable) -> None:
        self.set = codec_set
        self.table = table

    def quantise(self, values: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def dequantise(self, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        stamp_and_check_set(self.set, ctx, encoding=True)
        parts = []
        for t in tensors.values():
            rows = torch.nan_to_num(as_rows(t.float()))
            parts.append((self.quantise(rows), rows.shape[1]))
        d = parts[0][1] if parts else 1
        if any(p[1] != d for p in parts):
            raise CodecError("all tensors coded by one table coder must have the same row length")
        codes = np.concatenate([p[0].reshape(-1) for p in parts]) if parts else np.zeros(0, np.int64)
        return self.table.encode(codes, d)

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        stamp_and_check_set(self.set, ctx, encoding=False)
        dims = {info_rows(i)[1] for i in infos}
        if len(dims) > 1:
            raise CodecError("all tensors coded by one table coder must have the same row length")
        total = sum(i.numel for i in infos)
        codes = self.table.decode(data, total, dims.pop() if dims else 1)
        out, pos = {}, 0
        for info in infos:
            values = self.dequantise(codes[pos:pos + info.numel])
            out[info.name] = torch.from_numpy(values.astype(np.float32).reshape(info.shape))
            pos += info.numel
        return out


@register_terminal("fcmq")
class FcmQuantCoder(_TableCoder):
    """FCM on hidden states: clip to the fitted range, ``fcm_bits``-bit min–max quantisation, fitted rANS."""

    request_params = ("fcm_bits",)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        self.bits = int_param(params, "fcm_bits", 4, min(FCM_BITS), max(FCM_BITS))
        codec_set = load_codec_set(weights_dir, FCM_FILE)
        if self.bits not in FCM_BITS:
            raise CodecError(f"codec param 'fcm_bits' must be one of {FCM_BITS} (fitted tables), got {self.bits}")
        lo, hi = (float(v) for v in codec_set.array(FCM_FILE, "range"))
        if not hi > lo:
            raise CodecError(f"codec set {codec_set.folder}: FCM range [{lo}, {hi}] is empty")
        self.lo, self.hi, self.levels = lo, hi, (1 << self.bits)
        super().__init__(codec_set, FrequencyTable(codec_set.array(FCM_FILE, f"counts_b{self.bits}")))

    def quantise(self, values: torch.Tensor) -> np.ndarray:
        return fcm_codes(values, self.lo, self.hi, self.bits).numpy()

    def dequantise(self, codes: np.ndarray) -> np.ndarray:
        return self.lo + codes.astype(np.float64) / (self.levels - 1) * (self.hi - self.lo)


def fcm_codes(values: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Integer codes in ``[0, 2^bits)`` of values clipped to ``[lo, hi]`` (also used by the fitting)."""
    levels = (1 << bits) - 1
    return torch.round((values.clamp(lo, hi) - lo) / (hi - lo) * levels).long()


def nearest_centre(values: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest sorted centre (the K-means assignment) of every value."""
    mids = (centres[1:] + centres[:-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous().float())


@register_terminal("dtufcq")
class DtufcQuantCoder(_TableCoder):
    """DT-UFC on hidden states: nearest of ``dtufc_k`` fitted centres, indices coded with the fitted table."""

    request_params = ("dtufc_k",)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        k = int_param(params, "dtufc_k", 256, 2, 1 << 16)
        if k not in DTUFC_K:
            raise CodecError(f"codec param 'dtufc_k' must be one of {DTUFC_K} (fitted centres), got {k}")
        codec_set = load_codec_set(weights_dir, DTUFC_FILE)
        self.centres = codec_set.array(DTUFC_FILE, f"centres_k{k}").float().reshape(-1)
        if self.centres.numel() != k or not (self.centres[1:] > self.centres[:-1]).all():
            raise CodecError(f"codec set {codec_set.folder}: centres_k{k} are not {k} increasing values")
        super().__init__(codec_set, FrequencyTable(codec_set.array(DTUFC_FILE, f"counts_k{k}")))

    def quantise(self, values: torch.Tensor) -> np.ndarray:
        return nearest_centre(values, self.centres).numpy()

    def dequantise(self, codes: np.ndarray) -> np.ndarray:
        return self.centres.numpy()[codes]


_HIDDEN = (LLM_SOURCE,)
register_preset("fcm-hidden", "fcmq", "FCM: fitted-range clip, 4-bit min-max quantisation, fitted rANS (digital)",
                sources=_HIDDEN, fcm_bits="4")
register_preset("fcm-hidden+ol", "outliers+fcmq",
                "fcm-hidden with outliers (> 16x median |h|) as a counted float16 side channel (digital)",
                sources=_HIDDEN, fcm_bits="4", ol_factor="16")
register_preset("dtufc-hidden", "dtufcq",
                "DT-UFC: 256 fitted K-means centres, indices rANS-coded with a fitted table (digital)",
                sources=_HIDDEN, dtufc_k="256")
register_preset("dtufc-hidden-16", "dtufcq",
                "DT-UFC with 16 fitted centres, indices rANS-coded with a fitted table (digital)",
                sources=_HIDDEN, dtufc_k="16")

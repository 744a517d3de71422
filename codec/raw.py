"""``raw-fp16`` and ``raw-fp32``: the features as IEEE floats, no compression.

``raw-fp16`` is the MEG-DT digital baseline. ``raw-fp32`` sends the exact float32 bytes: the lossless
reference against which a split LLM must reproduce the monolithic model token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from codec.base import CodecError, SourceCoder, StageContext, TensorInfo
from codec.registry import register_preset, register_terminal


@register_terminal("fp16")
class Fp16Coder(SourceCoder):
    """Concatenates the tensors as little-endian float16, in header order."""

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params, weights_dir

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        return b"".join(t.to(torch.float16).numpy().astype("<f2").tobytes() for t in tensors.values())

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        expected = 2 * sum(i.numel for i in infos)
        if len(data) != expected:
            raise CodecError(f"fp16 payload has {len(data)} bytes, expected {expected}")
        out, pos = {}, 0
        for info in infos:
            n = 2 * info.numel
            values = np.frombuffer(data[pos:pos + n], dtype="<f2").astype(np.float32)
            out[info.name] = torch.from_numpy(values.reshape(info.shape).copy())
            pos += n
        return out


@register_terminal("fp32")
class Fp32Coder(SourceCoder):
    """Concatenates the tensors as little-endian float32, in header order (bit-exact)."""

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params, weights_dir

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        return b"".join(t.to(torch.float32).numpy().astype("<f4").tobytes() for t in tensors.values())

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        expected = 4 * sum(i.numel for i in infos)
        if len(data) != expected:
            raise CodecError(f"fp32 payload has {len(data)} bytes, expected {expected}")
        out, pos = {}, 0
        for info in infos:
            n = 4 * info.numel
            values = np.frombuffer(data[pos:pos + n], dtype="<f4").astype(np.float32)
            out[info.name] = torch.from_numpy(values.reshape(info.shape).copy())
            pos += n
        return out


register_preset("raw-fp16", "fp16", "Features as float16, uncompressed (digital)", sources=("image", "llm-hidden"))
register_preset("raw-fp32", "fp32", "Features as exact float32, uncompressed (digital, lossless)",
                sources=("image", "llm-hidden"))

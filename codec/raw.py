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


class _FloatCoder(SourceCoder):
    """Concatenates the tensors as little-endian IEEE floats of :attr:`dtype`, in header order."""

    dtype: str = "<f4"

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params, weights_dir

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        return b"".join(t.to(torch.float32).numpy().astype(self.dtype).tobytes() for t in tensors.values())

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        size = np.dtype(self.dtype).itemsize
        expected = size * sum(i.numel for i in infos)
        if len(data) != expected:
            raise CodecError(f"{self.name} payload has {len(data)} bytes, expected {expected}")
        out, pos = {}, 0
        for info in infos:
            n = size * info.numel
            values = np.frombuffer(data[pos:pos + n], dtype=self.dtype).astype(np.float32)
            out[info.name] = torch.from_numpy(values.reshape(info.shape).copy())
            pos += n
        return out


@register_terminal("fp16")
class Fp16Coder(_FloatCoder):
    """Half floats: the MEG-DT digital baseline."""

    name = "fp16"
    dtype = "<f2"


@register_terminal("fp32")
class Fp32Coder(_FloatCoder):
    """Single floats, bit-exact."""

    name = "fp32"
    dtype = "<f4"


register_preset("raw-fp16", "fp16", "Features as float16, uncompressed (digital)", sources=("image", "llm-hidden"))
register_preset("raw-fp32", "fp32", "Features as exact float32, uncompressed (digital, lossless)",
                sources=("image", "llm-hidden"))

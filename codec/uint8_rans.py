"""``uint8``: per-tensor uniform 8-bit quantisation, then CompressAI's rANS coder.

Each channel's quantised values are coded under a discretised Gaussian whose mean and scale are measured
on that channel and sent (float16) inside the payload, so the reported rate is the real bitstream length
including that side information. Values outside the Gaussian's tails use rANS escape codes, so any data
round-trips bit-exactly.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import numpy as np
import torch
from compressai.entropy_models import GaussianConditional

from codec.base import CodecError, SourceCoder, StageContext, TensorInfo
from codec.registry import register_preset, register_terminal

_MAGIC = b"U8R1"
# Scale table as CompressAI's hyperprior models use it, extended so that flat 8-bit histograms fit.
_SCALES = torch.exp(torch.linspace(np.log(0.11), np.log(256.0), 64))


@functools.lru_cache(maxsize=1)
def _gaussian_coder() -> GaussianConditional:
    # Building the CDF tables costs ~0.5 s and they never change, so every coder shares one read-only model;
    # its compress/decompress keep no state between calls.
    coder = GaussianConditional(None)
    coder.update_scale_table(_SCALES)
    coder.update()
    return coder


def _as_nchw(t: torch.Tensor) -> torch.Tensor:
    """View a tensor as (1, C, H, W): channel = dim -3 when there is one, else one channel."""
    if t.dim() >= 3:
        c, h, w = t.shape[-3], t.shape[-2], t.shape[-1]
        lead = int(np.prod(t.shape[:-3])) if t.dim() > 3 else 1
        return t.reshape(1, lead * c, h, w)
    return t.reshape(1, 1, 1, -1)


@register_terminal("rans8")
class Uint8RansCoder(SourceCoder):
    """Quantise each tensor to ``bits`` (default 8) uniformly between its min and max, entropy-code with rANS."""

    request_params = ("bits",)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        try:
            self.bits = int(params.get("bits", "8"))
        except ValueError as exc:
            raise CodecError(f"codec param 'bits' must be an integer, got {params.get('bits')!r}") from exc
        if not 1 <= self.bits <= 8:
            raise CodecError(f"codec param 'bits' must be in [1, 8], got {self.bits}")
        self._coder = _gaussian_coder()

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        out = bytearray(_MAGIC)
        for t in tensors.values():
            lo, hi = float(t.min()), float(t.max())
            span = hi - lo if hi > lo else 1.0
            q = torch.round((t - lo) / span * self.levels).clamp(0, self.levels)
            x = _as_nchw(q)
            mean = x.mean(dim=(0, 2, 3)).round()
            scale = x.std(dim=(0, 2, 3), unbiased=False).clamp_min(0.11)
            means = mean.view(1, -1, 1, 1).expand_as(x).contiguous()
            indexes = self._coder.build_indexes(scale.view(1, -1, 1, 1).expand_as(x).contiguous())
            stream = self._coder.compress(x, indexes, means=means)[0]
            side = mean.to(torch.float16).numpy().astype("<f2").tobytes() + \
                scale.to(torch.float16).numpy().astype("<f2").tobytes()
            out += struct.pack("<ffI", lo, hi, len(stream)) + side + stream
        return bytes(out)

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        if data[:4] != _MAGIC:
            raise CodecError("uint8 payload does not start with its magic bytes")
        pos, out = 4, {}
        for info in infos:
            if pos + 12 > len(data):
                raise CodecError(f"uint8 payload truncated before tensor {info.name!r}")
            lo, hi, n = struct.unpack_from("<ffI", data, pos)
            pos += 12
            shape4 = _as_nchw(torch.empty(info.shape, device="meta")).shape
            channels = shape4[1]
            side_len = 4 * channels
            if not (np.isfinite(lo) and np.isfinite(hi)) or pos + side_len + n > len(data):
                raise CodecError(f"uint8 payload for tensor {info.name!r} is truncated or corrupt")
            mean = torch.from_numpy(np.frombuffer(data[pos:pos + 2 * channels], "<f2").astype(np.float32))
            scale = torch.from_numpy(
                np.frombuffer(data[pos + 2 * channels:pos + side_len], "<f2").astype(np.float32))
            pos += side_len
            if not (torch.isfinite(mean).all() and torch.isfinite(scale).all()):
                raise CodecError(f"uint8 side information for tensor {info.name!r} is corrupt")
            stream = data[pos:pos + n]
            pos += n
            means = mean.view(1, -1, 1, 1).expand(shape4).contiguous()
            indexes = self._coder.build_indexes(scale.clamp(0.11, 256).view(1, -1, 1, 1).expand(shape4).contiguous())
            try:
                q = self._coder.decompress([stream], indexes, means=means)
            except (RuntimeError, ValueError) as exc:
                raise CodecError(f"rANS stream of tensor {info.name!r} does not decode: {exc}") from exc
            q = q.round().clamp(0, self.levels)
            span = hi - lo if hi > lo else 1.0
            out[info.name] = (q / self.levels * span + lo).reshape(info.shape).float()
        if pos != len(data):
            raise CodecError(f"uint8 payload has {len(data) - pos} unexpected trailing bytes")
        return out


register_preset("uint8", "rans8", "Per-tensor uniform 8-bit quantisation + rANS entropy coding (digital)",
                sources=("image", "llm-hidden"))

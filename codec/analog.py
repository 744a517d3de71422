"""``analog``: features sent as analog channel symbols (the MEG-DT scheme).

Consecutive pairs of feature values form one complex symbol, scaled to unit average power; the scale is
one float of side information (counted). The device receives noisy symbols and its noise-robust decoder
absorbs the error; nothing is quantised, so quality degrades gracefully with SNR instead of falling off a
cliff.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

from codec.base import AnalogMapper, CodecError, StageContext, TensorInfo
from codec.registry import register_preset, register_terminal


@register_terminal("linear-analog")
class LinearAnalogMapper(AnalogMapper):
    """Real feature values → complex symbols, two values a symbol, unit average symbol power."""

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params, weights_dir

    def to_symbols(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> np.ndarray:
        flat = torch.cat([t.reshape(-1) for t in tensors.values()]).numpy().astype(np.float64)
        if flat.size % 2:
            flat = np.append(flat, 0.0)
        pairs = flat.reshape(-1, 2)
        symbols = pairs[:, 0] + 1j * pairs[:, 1]
        power = float(np.mean(np.abs(symbols) ** 2)) or 1.0
        gain = 1.0 / np.sqrt(power)
        ctx.side["linear-analog"] = struct.pack("<f", gain)
        return (symbols * gain).astype(np.complex64)

    def from_symbols(self, symbols: np.ndarray, infos: list[TensorInfo], ctx: StageContext
                     ) -> dict[str, torch.Tensor]:
        blob = ctx.side.get("linear-analog", b"")
        if len(blob) != 4:
            raise CodecError("analog payload lacks its 4-byte gain side information")
        (gain,) = struct.unpack("<f", blob)
        if not np.isfinite(gain) or gain <= 0:
            raise CodecError(f"analog gain side information is invalid: {gain}")
        total = sum(i.numel for i in infos)
        if symbols.size != (total + 1) // 2:
            raise CodecError(f"analog payload has {symbols.size} symbols, expected {(total + 1) // 2}")
        values = np.empty(2 * symbols.size, dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            values[0::2] = symbols.real / gain
            values[1::2] = symbols.imag / gain
        if not np.isfinite(values).all():
            # A forged or corrupted gain (e.g. a denormal) would hand the decoder infinities.
            raise CodecError("analog symbols do not rescale to finite values: gain or symbols are corrupt")
        out, pos = {}, 0
        for info in infos:
            out[info.name] = torch.from_numpy(values[pos:pos + info.numel].reshape(info.shape).copy())
            pos += info.numel
        return out


register_preset("analog", "linear-analog", "Features as analog complex symbols, 2 values a symbol (MEG-DT)",
                sources=("image", "llm-hidden"))

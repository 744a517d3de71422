"""Per-row integer quantisers for hidden states: ``int8-token`` and the QuaRot-style ``hadamard4``.

Why per row: an LLM's hidden state is sent one token (one row of ``d`` values) at a time during decoding,
and rows differ in scale by orders of magnitude (the first token, attention sinks), so a scale per row, or
per group of ``q_group`` values inside a row, costs little (16 bits a group) and keeps every row's own
resolution. Tensors of any shape are read as rows along their last dimension, so the codecs also work on
image latents (rows of the latent's width).

``rowint`` (terminal)
    Symmetric absmax quantisation to ``q_bits`` bits (levels ``-(2^(b-1)-1) .. 2^(b-1)-1``), one float16 scale
    per group, then the codes bit-packed. The payload is ``scales ‖ packed codes`` per tensor; its size is a
    function of the shapes and params alone, so no lengths travel and the rate is exactly what is sent.
``hadamard`` (stage)
    A random-sign Walsh–Hadamard rotation of every row (QuaRot): ``y = H·diag(s)·x / sqrt(n)`` with the last
    dimension zero-padded to a power of two ``n`` and signs ``s`` drawn from ``hadamard_seed``. The rotation
    is orthogonal, so it spreads a row's few large values over all of its entries and a 4-bit grid fits
    them; the device applies the exact inverse. The unpadded size goes in the header (configuration).

``hadamard4`` uses one scale per row: on the embedded LLM at k = 2 (``bench/results/llm_rate.md``), groups of
64 and 32 values buy 0.7 and 1.7 dB of hidden-state PSNR for 0.125 and 0.375 more bits a value and leave the
next-token agreement unchanged (98.8 %, 98.7 %, 98.9 %).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from codec.base import CodecError, SourceCoder, StageContext, TensorInfo, TensorStage
from codec.primitives import int_param
from codec.registry import register_preset, register_stage, register_terminal

#: Largest finite float16 magnitude: scales are sent as float16.
FP16_MAX = 65504.0
#: Largest padded row the Hadamard stage accepts (a header cannot make the device allocate more).
MAX_HADAMARD_DIM = 1 << 16





def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``(R, d)`` view of a tensor: rows along its last dimension (a 0-d tensor is one row of one value)."""
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(-1, t.shape[-1])


def info_rows(info: TensorInfo) -> tuple[int, int]:
    """``(rows, d)`` of a tensor description, as :func:`as_rows` sees it."""
    if not info.shape:
        return 1, 1
    d = info.shape[-1]
    return info.numel // d, d


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned codes ``< 2^bits`` → little-bit-first packed bytes (``ceil(n·bits/8)`` of them)."""
    planes = (codes.astype(np.uint16)[:, None] >> np.arange(bits, dtype=np.uint16)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` for ``n`` codes."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=n * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16))
    return (flat.reshape(n, bits).astype(np.uint16) * weights).sum(axis=1).astype(np.int32)


@register_terminal("rowint")
class RowIntCoder(SourceCoder):
    """Per-row (or per-group) absmax integer quantisation, float16 scales, bit-packed codes.

    Params: ``q_bits`` (2-8, default 8) and ``q_group`` (values per scale; 0, the default, = the whole row;
    otherwise it must divide the row length).
    """

    request_params = ("q_bits", "q_group")

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        self.bits = int_param(params, "q_bits", 8, 2, 8)
        self.group = int_param(params, "q_group", 0, 0, 1 << 20)
        self.qmax = (1 << (self.bits - 1)) - 1

    def _group_size(self, d: int) -> int:
        g = self.group or d
        if d % g:
            raise CodecError(f"codec param 'q_group'={g} does not divide the row length {d}")
        return g

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        out = bytearray()
        for t in tensors.values():
            rows = torch.nan_to_num(as_rows(t.float()), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
            g = self._group_size(rows.shape[1])
            groups = rows.reshape(-1, g)
            # Round the scale to float16 first, so the edge quantises with exactly the scale the device reads.
            scale = (groups.abs().amax(dim=1) / self.qmax).clamp(max=FP16_MAX).half().float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            q = torch.round(groups / scale[:, None]).clamp(-self.qmax, self.qmax).to(torch.int32)
            out += scale.half().numpy().astype("<f2").tobytes()
            out += pack_bits((q + self.qmax).reshape(-1).numpy(), self.bits)
        return bytes(out)

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        out, pos = {}, 0
        for info in infos:
            rows, d = info_rows(info)
            g = self._group_size(d)
            n_groups = info.numel // g
            n_scale, n_codes = 2 * n_groups, math.ceil(info.numel * self.bits / 8)
            if pos + n_scale + n_codes > len(data):
                raise CodecError(f"rowint payload truncated in tensor {info.name!r}: {len(data)} bytes")
            scale = np.frombuffer(data[pos:pos + n_scale], dtype="<f2").astype(np.float32)
            pos += n_scale
            if not np.isfinite(scale).all():
                raise CodecError(f"rowint scales of tensor {info.name!r} are not finite (corrupt payload)")
            codes = unpack_bits(data[pos:pos + n_codes], info.numel, self.bits) - self.qmax
            pos += n_codes
            if (np.abs(codes) > self.qmax).any():
                raise CodecError(f"rowint codes of tensor {info.name!r} are out of range (corrupt payload)")
            values = codes.reshape(n_groups, g).astype(np.float32) * scale[:, None]
            out[info.name] = torch.from_numpy(values.reshape(info.shape).copy())
        if pos != len(data):
            raise CodecError(f"rowint payload has {len(data) - pos} unexpected trailing bytes")
        return out


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh–Hadamard transform along the last dimension (a power of two): its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise CodecError(f"Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).contiguous()


def hadamard_signs(n: int, seed: int) -> torch.Tensor:
    """The ±1 diagonal of the rotation: a pure function of (n, seed), so edge and device agree."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1


def next_pow2(d: int) -> int:
    return 1 << max(0, (d - 1).bit_length())


@register_stage("hadamard")
class HadamardStage(TensorStage):
    """QuaRot-style random-sign Hadamard rotation of each row (see the module docstring).

    Params: ``hadamard_seed`` (integer, default 0); ``hadamard_dims`` is written by the edge (the rows'
    unpadded lengths, comma-separated in tensor order) and read by the device.
    """

    request_params = ("hadamard_seed",)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        self.seed = int_param(params, "hadamard_seed", 0, 0, 2**63 - 1)

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        out, dims = {}, []
        for name, t in tensors.items():
            x = t.float().reshape(1, 1) if t.dim() == 0 else t.float()
            d = x.shape[-1]
            n = next_pow2(d)
            if n > MAX_HADAMARD_DIM:
                raise CodecError(f"hadamard: row length {d} of {name!r} is over the limit {MAX_HADAMARD_DIM}")
            padded = torch.nn.functional.pad(x, (0, n - d))
            out[name] = fwht(padded * hadamard_signs(n, self.seed))
            dims.append(str(d))
        ctx.params["hadamard_dims"] = ",".join(dims)
        return out

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        text = ctx.params.get("hadamard_dims", "")
        try:
            dims = [int(s) for s in text.split(",")] if text else []
        except ValueError as exc:
            raise CodecError(f"malformed codec param 'hadamard_dims': {text[:40]!r}") from exc
        if len(dims) != len(tensors):
            raise CodecError(f"codec param 'hadamard_dims' names {len(dims)} tensors, the payload has {len(tensors)}")
        out = {}
        for (name, y), d in zip(tensors.items(), dims):
            if y.dim() == 0 or y.shape[-1] != next_pow2(d) or d < 1:
                raise CodecError(f"hadamard: tensor {name!r} of shape {tuple(y.shape)} cannot hold rows of {d}")
            n = y.shape[-1]
            x = fwht(torch.nan_to_num(y.float())) * hadamard_signs(n, self.seed)
            out[name] = x[..., :d].contiguous()
        return out


SOURCES_HIDDEN = ("llm-hidden",)
register_preset("int8-token", "rowint", "Per-token absmax int8, a float16 scale per row (digital)",
                sources=SOURCES_HIDDEN, q_bits="8", q_group="0")
register_preset("hadamard4", "hadamard+rowint",
                "QuaRot-style random-sign Hadamard rotation, then 4-bit absmax per row (digital)",
                sources=SOURCES_HIDDEN, q_bits="4", q_group="0", hadamard_seed="0")

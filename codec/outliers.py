"""``outliers``: a sparse side channel for the few hidden-state values a clipping quantiser would destroy.

Why: real LLMs carry *massive activations*: a handful of dimensions hundreds to thousands of times the median
|h|, and a first token (attention sink) whose whole row is huge. A quantiser sized for the bulk clips them (a
fitted range) or spends its whole grid on them (absmax), and the model downstream breaks. This stage takes
them out before the terminal coder and sends them exactly enough (float16) as counted side information; the
terminal then codes a well-behaved tensor, and the device puts them back after decoding.

Rule, per tensor: the threshold is ``ol_factor`` × the median |h| of the whole tensor (the prompt at prefill,
the row at a decode step). A value above it is an outlier. A row with more than ``ol_dense`` of its values
above it (the huge first token) is sent whole as float16; the other outliers go as a sparse list. Outliers
are replaced by 0 in what the terminal sees.

Side information (key ``ol``; nothing at all when a payload has no outlier), per tensor in header order:
``varint n_rows, varint n_sparse, delta-varint row ids, delta-varint flat indices, float16 row values,
float16 sparse values``. Every byte is counted in :attr:`EncodedPayload.bits_sent`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from codec.base import CodecError, StageContext, TensorStage
from codec.hidden_quant import FP16_MAX, as_rows
from codec.primitives import float_param, read_varint, varint
from codec.registry import register_preset, register_stage

SIDE_KEY = "ol"
MALFORMED = "outlier side information is truncated or malformed"


def _deltas(ids: np.ndarray) -> np.ndarray:
    return np.diff(ids, prepend=0) if ids.size else ids


def select_outliers(rows: torch.Tensor, factor: float, dense: float) -> tuple[np.ndarray, np.ndarray]:
    """(dense row ids, sparse flat indices) of the outliers of ``rows (R, d)`` (see the module docstring)."""
    mag = rows.abs()
    ref = float(mag.median())
    if ref <= 0:
        ref = float(mag.mean())
    if ref <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hit = mag > factor * ref
    dense_rows = hit.float().mean(dim=1) > dense
    hit &= ~dense_rows[:, None]
    return (torch.nonzero(dense_rows).reshape(-1).numpy().astype(np.int64),
            torch.nonzero(hit.reshape(-1)).reshape(-1).numpy().astype(np.int64))


@register_stage("outliers")
class OutlierStage(TensorStage):
    """Values above ``ol_factor`` × median |h| travel as counted float16 side information (module docstring).

    Params: ``ol_factor`` (default 16), ``ol_dense`` (fraction of a row above which the row goes whole;
    default 0.25).
    """

    request_params = ("ol_factor", "ol_dense")

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        self.factor = float_param(params, "ol_factor", 16.0, 1.0, 1e6)
        self.dense = float_param(params, "ol_dense", 0.25, 0.0, 1.0)

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        side, out, any_outlier = bytearray(), {}, False
        for name, t in tensors.items():
            rows = torch.nan_to_num(as_rows(t.float()), nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX).clone()
            dense_ids, sparse_idx = select_outliers(rows, self.factor, self.dense)
            side += varint(dense_ids.size)
            side += varint(sparse_idx.size)
            for v in _deltas(dense_ids):
                side += varint(int(v))
            for v in _deltas(sparse_idx):
                side += varint(int(v))
            flat = rows.reshape(-1)
            side += rows[dense_ids].clamp(-FP16_MAX, FP16_MAX).half().numpy().astype("<f2").tobytes()
            side += flat[sparse_idx].clamp(-FP16_MAX, FP16_MAX).half().numpy().astype("<f2").tobytes()
            any_outlier |= bool(dense_ids.size or sparse_idx.size)
            rows[dense_ids] = 0.0
            flat[sparse_idx] = 0.0
            out[name] = rows.reshape(t.shape)
        if any_outlier:
            ctx.side[SIDE_KEY] = bytes(side)
        return out

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        data = ctx.side.get(SIDE_KEY)
        if data is None:
            return dict(tensors)
        out, pos = {}, 0
        for name, t in tensors.items():
            rows = as_rows(t.float()).clone()
            n_rows, d = rows.shape
            n_dense, pos = read_varint(data, pos, len(data), 56, MALFORMED)
            n_sparse, pos = read_varint(data, pos, len(data), 56, MALFORMED)
            if n_dense > n_rows or n_sparse > rows.numel():
                raise CodecError(f"outlier side information of {name!r} counts more entries than the tensor holds")
            ids = []
            for count, limit in ((n_dense, n_rows), (n_sparse, rows.numel())):
                acc, got = 0, []
                for _ in range(count):
                    delta, pos = read_varint(data, pos, len(data), 56, MALFORMED)
                    acc += delta
                    got.append(acc)
                if got and (acc >= limit or any(b <= a for a, b in zip(got, got[1:]))):
                    raise CodecError(f"outlier indices of {name!r} are out of range or not increasing")
                ids.append(np.asarray(got, dtype=np.int64))
            n_vals = n_dense * d + n_sparse
            if pos + 2 * n_vals > len(data):
                raise CodecError(f"outlier side information of {name!r} is truncated")
            values = np.frombuffer(data[pos:pos + 2 * n_vals], dtype="<f2").astype(np.float32)
            pos += 2 * n_vals
            if not np.isfinite(values).all():
                raise CodecError(f"outlier values of {name!r} are not finite (corrupt side information)")
            rows[torch.from_numpy(ids[0])] = torch.from_numpy(values[:n_dense * d].reshape(n_dense, d).copy())
            rows.view(-1)[torch.from_numpy(ids[1])] = torch.from_numpy(values[n_dense * d:].copy())
            out[name] = rows.reshape(t.shape)
        if pos != len(data):
            raise CodecError(f"outlier side information has {len(data) - pos} unexpected trailing bytes")
        return out


_HIDDEN = ("llm-hidden",)
register_preset("int8-token+ol", "outliers+rowint",
                "int8-token with outliers (> 16x median |h|) as a counted float16 side channel (digital)",
                sources=_HIDDEN, q_bits="8", q_group="0", ol_factor="16")
register_preset("hadamard4+ol", "outliers+hadamard+rowint",
                "hadamard4 with outliers taken out before the rotation as a float16 side channel (digital)",
                sources=_HIDDEN, q_bits="4", q_group="0", hadamard_seed="0", ol_factor="16")

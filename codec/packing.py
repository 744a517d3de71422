"""Packing stage ``tile``: lay a latent's channels out as one single-channel plane, and back.

Why: CompressAI-style coders trained for one input channel then serve any generator's latents (SD3's
16x128x128 becomes a 4x4 grid of 128x128 tiles = one 512x512 plane; the embedded 4x16x16 latents become a
2x2 grid = one 32x32 plane), which is how the DT-UFC reference feeds features to its coders. With
``tile_mode=native`` channels stay channels and the tensor is only viewed as (B, C, H, W), for coders
trained on a model's own channel count.

The pre-tiling shapes travel in the header (``tile_shapes``): they are configuration derived from the
request, not per-image data.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from codec.base import CodecError, StageContext, TensorStage
from codec.registry import register_stage

_MODES = ("grid", "native")


def grid_for(channels: int) -> tuple[int, int]:
    """(rows, cols) with rows*cols == channels, as square as possible (rows <= cols)."""
    rows = max(d for d in range(1, int(math.isqrt(channels)) + 1) if channels % d == 0)
    return rows, channels // rows


def tile_planes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, rows*H, cols*W), channel r*cols+c at tile (r, c)."""
    b, c, h, w = x.shape
    rows, cols = grid_for(c)
    return x.reshape(b, rows, cols, h, w).permute(0, 1, 3, 2, 4).reshape(b, 1, rows * h, cols * w)


def untile_planes(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of :func:`tile_planes`."""
    b, _, hh, ww = x.shape
    rows, cols = grid_for(channels)
    h, w = hh // rows, ww // cols
    return x.reshape(b, rows, h, cols, w).permute(0, 1, 3, 2, 4).reshape(b, channels, h, w)


def _as_bchw_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    if len(shape) < 3:
        raise CodecError(f"tile needs tensors of at least 3 dims (C, H, W), got shape {shape}")
    lead = math.prod(shape[:-3]) if len(shape) > 3 else 1
    return lead, shape[-3], shape[-2], shape[-1]


def _shapes_to_str(shapes: dict[str, tuple[int, ...]]) -> str:
    return ";".join(f"{n}:{'x'.join(str(s) for s in sh)}" for n, sh in shapes.items())


def _shapes_from_str(text: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    try:
        for item in text.split(";"):
            name, shape = item.rsplit(":", 1)
            dims = tuple(int(s) for s in shape.split("x"))
            if any(d <= 0 or d > (1 << 24) for d in dims):
                raise ValueError(f"dimension out of range in {shape!r}")
            out[name] = dims
    except ValueError as exc:
        raise CodecError(f"malformed codec param 'tile_shapes': {text[:80]!r}") from exc
    return out


@register_stage("tile")
class TileStage(TensorStage):
    """Tensors (..., C, H, W) -> (B, 1, rows*H, cols*W) planes (``grid``) or (B, C, H, W) (``native``)."""

    request_params = ("tile_mode",)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        self.mode = params.get("tile_mode", "grid")
        if self.mode not in _MODES:
            raise CodecError(f"codec param 'tile_mode' must be one of {_MODES}, got {self.mode!r}")

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(int(s) for s in t.shape) for name, t in tensors.items()}
        ctx.params["tile_shapes"] = _shapes_to_str(shapes)
        out = {}
        for name, t in tensors.items():
            x = t.reshape(_as_bchw_shape(shapes[name]))
            out[name] = tile_planes(x) if self.mode == "grid" else x
        return out

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        shapes = _shapes_from_str(ctx.params.get("tile_shapes", ""))
        out = {}
        for name, t in tensors.items():
            if name not in shapes:
                raise CodecError(f"tile_shapes lacks tensor {name!r}")
            b, c, h, w = _as_bchw_shape(shapes[name])
            rows, cols = grid_for(c)
            expected = (b, 1, rows * h, cols * w) if self.mode == "grid" else (b, c, h, w)
            if tuple(t.shape) != expected:
                raise CodecError(f"tensor {name!r} has coded shape {tuple(t.shape)}, tile_shapes implies {expected}")
            x = untile_planes(t, c) if self.mode == "grid" else t
            out[name] = x.reshape(shapes[name])
        return out

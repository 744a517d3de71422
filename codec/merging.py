"""``merge``: ToMe-style token merging of a latent's spatial tokens (the E2E-MEG-DT front end).

Why: the E2E-MEG scheme halves the channel uses by merging redundant latent tokens before the analog JSCC.
A latent (..., C, H, W) is read as H·W tokens of C values in raster order. Tokens alternate into sets A (even
positions) and B (odd positions); every A token finds its most cosine-similar B token, and the ``r`` A tokens
with the highest similarity are averaged into their B match (size-weighted, as ToMe does). The stage outputs
(..., C, T') tokens, T' = H·W − r, a static shape given the params: the unmerged A tokens in order, then all B
tokens in order.

The device unmerges: each merged A token copies its destination's value. What it needs is per-image data, so
it travels as counted side information ``ctx.side["merge"]``: a bitmask of |A| bits (which A tokens merged;
left out when every A token merges, since an all-ones mask carries nothing) then the destination of each merged
token, MSB first, packed per image and padded to whole bytes once. The paper assumes these indices arrive for
free; we count them. How a destination may be chosen, and so what it costs (header param ``merge_map``):

``global``  any B token (ToMe's bipartite matching): ⌈log2 |B|⌉ bits per merged token (896 bits for a 16x16
            latent at ratio 0.5);
``local``   one of the four nearest B tokens in the latent grid (right, left, below, above, then diagonals):
            2 bits per merged token;
``fixed``   the B token next to it (its right neighbour, else the nearest): nothing to send at ratio 0.5. The
            device rebuilds the map from the shape alone; the price is that a token may merge into a partner
            that is not its most similar one.

The merge and unmerge maths are plain batched torch functions (:func:`merge_tokens`, :func:`unmerge_tokens`) so
that the JSCC training backpropagates through exactly what the runtime stage does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from codec.base import CodecError, StageContext, TensorStage
from codec.registry import register_stage

#: Header param holding each tensor's spatial shape before merging (``name:HxW;name:HxW``).
SHAPES_PARAM = "merge_shapes"
RATIO_PARAM = "merge_ratio"
MAP_PARAM = "merge_map"
DEFAULT_RATIO = 0.5
MAP_MODES: tuple[str, ...] = ("global", "local", "fixed")
#: Candidate destinations of a ``local`` map (2 bits).
LOCAL_CANDIDATES = 4


@dataclass(frozen=True)
class MergePlan:
    """Sizes of one merge: tokens in, |A|, |B|, merged count r, tokens out, and side-info bits per image."""

    n_tokens: int
    n_a: int
    n_b: int
    r: int
    mode: str = "global"

    @property
    def n_out(self) -> int:
        return self.n_tokens - self.r

    @property
    def dst_bits(self) -> int:
        if self.mode == "fixed" or self.n_b <= 1:
            return 0
        if self.mode == "local":
            return 2
        return max(1, math.ceil(math.log2(self.n_b)))

    @property
    def mask_bits(self) -> int:
        """The A bitmask, unless every A token merges (then it is all ones and is not sent)."""
        return self.n_a if 0 < self.r < self.n_a else 0

    @property
    def side_bits(self) -> int:
        """Bits of side information for one image: the A bitmask plus the destinations of merged tokens."""
        return self.mask_bits + self.r * self.dst_bits if self.r else 0


def plan_merge(n_tokens: int, ratio: float, mode: str = "global") -> MergePlan:
    """Sizes for merging ``n_tokens`` with ``ratio`` (the fraction of all tokens removed, capped at |A|)."""
    if n_tokens < 2:
        raise CodecError(f"token merging needs at least 2 tokens, got {n_tokens}")
    if not (0.0 <= ratio <= 1.0) or not math.isfinite(ratio):
        raise CodecError(f"codec param '{RATIO_PARAM}' must be in [0, 1], got {ratio}")
    if mode not in MAP_MODES:
        raise CodecError(f"codec param '{MAP_PARAM}' must be one of {', '.join(MAP_MODES)}, got {mode!r}")
    n_a, n_b = (n_tokens + 1) // 2, n_tokens // 2
    return MergePlan(n_tokens, n_a, n_b, min(n_a, int(round(ratio * n_tokens))), mode)


def local_candidates(h: int, w: int) -> torch.Tensor:
    """(|A|, 4) B-token indices each A token of an h x w raster may merge into under a ``local`` map: the
    nearest B tokens in the grid (right, left, below, above, then diagonals), padded with the first one. Column 0
    is the ``fixed`` map's partner. Both ends compute it from the shape alone."""
    n = h * w
    rows = []
    for p in range(0, n, 2):
        i, j = divmod(p, w)
        found: list[int] = []
        for di, dj in ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1)):
            ii, jj = i + di, j + dj
            q = ii * w + jj
            if 0 <= ii < h and 0 <= jj < w and q % 2 == 1 and q // 2 not in found:
                found.append(q // 2)
            if len(found) == LOCAL_CANDIDATES:
                break
        if not found:  # degenerate grids (one column of odd height...): the nearest B token in raster order
            found = [min(max((p + 1) // 2, 0), n // 2 - 1)]
        rows.append(found + [found[0]] * (LOCAL_CANDIDATES - len(found)))
    return torch.tensor(rows, dtype=torch.long)


def merge_tokens(x: torch.Tensor, ratio: float, mode: str = "global", hw: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching of tokens ``x`` (B, C, N) → (merged (B, C, N − r), merged_mask (B, |A|) bool,
    dst (B, |A|) long: each A token's B match, among the candidates ``mode`` allows).

    Differentiable in ``x`` (the matching itself is a hard choice). Ties are broken by token index so the
    edge and any re-run agree. ``hw`` (the raster's height and width) is needed by ``local`` and ``fixed``.
    """
    b, c, n = x.shape
    plan = plan_merge(n, ratio, mode)
    xa, xb = x[:, :, 0::2], x[:, :, 1::2]  # (B, C, |A|), (B, C, |B|)
    with torch.no_grad():
        na = torch.nn.functional.normalize(xa.float(), dim=1)
        nb = torch.nn.functional.normalize(xb.float(), dim=1)
        sim = torch.einsum("bca,bcd->bad", na, nb)  # (B, |A|, |B|)
        if mode == "global":
            best, dst = sim.max(dim=2)
        else:
            cand = local_candidates(*(hw or (1, n))).to(x.device)  # (|A|, 4)
            cand_sim = torch.gather(sim, 2, cand[None].expand(b, -1, -1))
            if mode == "fixed":
                best, pick = cand_sim[:, :, 0], torch.zeros(b, plan.n_a, dtype=torch.long, device=x.device)
            else:
                best, pick = cand_sim.max(dim=2)
            dst = cand[None].expand(b, -1, -1).gather(2, pick[..., None])[..., 0]
        order = torch.sort(-best, dim=1, stable=True).indices  # most similar first
        merged_mask = torch.zeros(b, plan.n_a, dtype=torch.bool, device=x.device)
        merged_mask.scatter_(1, order[:, :plan.r], True)
    return _apply_merge(x, merged_mask, dst, plan), merged_mask, dst


def _apply_merge(x: torch.Tensor, merged_mask: torch.Tensor, dst: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Average merged A tokens into their destinations; keep the rest; static output size."""
    b, c, _ = x.shape
    xa, xb = x[:, :, 0::2], x[:, :, 1::2]
    weight = merged_mask.to(x.dtype)  # (B, |A|)
    sums = xb.clone().scatter_add(2, dst[:, None, :].expand(b, c, plan.n_a), xa * weight[:, None, :])
    counts = torch.ones(b, plan.n_b, dtype=x.dtype, device=x.device).scatter_add(1, dst, weight)
    merged_b = sums / counts[:, None, :]
    kept_idx = torch.sort(merged_mask.to(torch.int8), dim=1, stable=True).indices[:, :plan.n_a - plan.r]
    kept_a = torch.gather(xa, 2, kept_idx[:, None, :].expand(b, c, plan.n_a - plan.r))
    return torch.cat([kept_a, merged_b], dim=2)


def unmerge_tokens(tokens: torch.Tensor, merged_mask: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`merge_tokens`: (B, C, N − r) → (B, C, N); merged A tokens copy their destination."""
    b, c, t = tokens.shape
    n_a = merged_mask.shape[1]
    r = int(merged_mask[0].sum()) if b else 0
    n = t + r
    n_b = n // 2
    if (n + 1) // 2 != n_a:
        raise CodecError(f"merge map describes {n_a} A tokens, but {t} tokens + {r} merged make {n}")
    kept_a, xb = tokens[:, :, :n_a - r], tokens[:, :, n_a - r:]
    kept_idx = torch.sort(merged_mask.to(torch.int8), dim=1, stable=True).indices[:, :n_a - r]
    xa = torch.gather(xb, 2, dst[:, None, :].clamp(0, max(n_b - 1, 0)).expand(b, c, n_a)).clone()
    xa.scatter_(2, kept_idx[:, None, :].expand(b, c, n_a - r), kept_a)
    out = tokens.new_empty(b, c, n)
    out[:, :, 0::2] = xa
    out[:, :, 1::2] = xb
    return out


def _codes(dst: np.ndarray, plan: MergePlan, cand: np.ndarray | None) -> np.ndarray:
    """Destinations (B indices) of merged A tokens → the numbers sent: B indices (global), candidate slots
    (local)."""
    if plan.mode != "local":
        return dst
    slots = np.argmax(cand == dst[:, None], axis=1)
    if not bool((cand[np.arange(len(dst)), slots] == dst).all()):
        raise CodecError("internal: a local merge destination is not one of its candidates")
    return slots


def pack_merge_map(merged_mask: torch.Tensor, dst: torch.Tensor, plan: MergePlan,
                   hw: tuple[int, int] | None = None) -> np.ndarray:
    """Bits (uint8 0/1 array) of the merge maps of a batch: per image the A bitmask (when sent) then the merged
    tokens' destinations, in ``plan.mode``'s coding."""
    if plan.side_bits == 0:
        return np.zeros(0, dtype=np.uint8)
    chunks = []
    weights = 1 << np.arange(plan.dst_bits - 1, -1, -1)
    cand = local_candidates(*(hw or (1, plan.n_tokens))).numpy() if plan.mode == "local" else None
    for mask, d in zip(merged_mask.cpu().numpy(), dst.cpu().numpy()):
        if plan.mask_bits:
            chunks.append(mask.astype(np.uint8))
        codes = _codes(d[mask], plan, None if cand is None else cand[mask])
        chunks.append(((codes[:, None] & weights) > 0).astype(np.uint8).reshape(-1))
    return np.concatenate(chunks)


def unpack_merge_map(bits: np.ndarray, batch: int, plan: MergePlan, hw: tuple[int, int] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_merge_map`; raises :class:`CodecError` on any inconsistency."""
    if bits.size != batch * plan.side_bits:
        raise CodecError(f"merge side information has {bits.size} bits, expected {batch * plan.side_bits}")
    masks = np.zeros((batch, plan.n_a), dtype=bool)
    dsts = np.zeros((batch, plan.n_a), dtype=np.int64)
    if plan.r == 0:
        return torch.from_numpy(masks), torch.from_numpy(dsts)
    cand = local_candidates(*(hw or (1, plan.n_tokens))).numpy() if plan.mode != "global" else None
    weights = 1 << np.arange(plan.dst_bits - 1, -1, -1)
    pos = 0
    for i in range(batch):
        if plan.mask_bits:
            mask = bits[pos:pos + plan.n_a].astype(bool)
            pos += plan.n_a
        else:
            mask = np.ones(plan.n_a, dtype=bool)
        if int(mask.sum()) != plan.r:
            raise CodecError(f"merge side information marks {int(mask.sum())} merged tokens, expected {plan.r}")
        codes = bits[pos:pos + plan.r * plan.dst_bits].reshape(plan.r, plan.dst_bits).astype(np.int64) @ weights
        pos += plan.r * plan.dst_bits
        if plan.mode == "fixed":
            d = cand[mask, 0]  # type: ignore[index]
        elif plan.mode == "local":
            d = cand[mask, codes]  # type: ignore[index]
        else:
            d = codes
        if d.size and int(d.max()) >= plan.n_b:
            raise CodecError(f"merge side information names destination {int(d.max())} of {plan.n_b} B tokens")
        masks[i] = mask
        dsts[i, mask] = d
    return torch.from_numpy(masks), torch.from_numpy(dsts)


def _parse_ratio(params: dict[str, str]) -> float:
    text = params.get(RATIO_PARAM, str(DEFAULT_RATIO))
    try:
        ratio = float(text)
    except ValueError as exc:
        raise CodecError(f"codec param '{RATIO_PARAM}' must be a number, got {text!r}") from exc
    plan_merge(2, ratio)  # validates the range
    return ratio


def _parse_map(params: dict[str, str]) -> str:
    mode = params.get(MAP_PARAM, "global")
    plan_merge(2, 0.0, mode)  # validates the mode
    return mode


def _parse_shapes(text: str) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    try:
        for item in text.split(";"):
            name, hw = item.rsplit(":", 1)
            h, w = (int(v) for v in hw.split("x"))
            if h <= 0 or w <= 0 or h * w > 1 << 24:
                raise ValueError(hw)
            shapes[name] = (h, w)
    except ValueError as exc:
        raise CodecError(f"malformed codec param '{SHAPES_PARAM}': {text[:80]!r}") from exc
    return shapes


@register_stage("merge")
class TokenMergeStage(TensorStage):
    """Merges each (..., C, H, W) tensor to (..., C, H·W − r) tokens; see the module docstring."""

    request_params = (RATIO_PARAM, MAP_PARAM)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del weights_dir
        self.ratio = _parse_ratio(params)
        self.mode = _parse_map(params)

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        shapes, bits = [], []
        for name, t in tensors.items():
            if t.dim() < 3:
                raise CodecError(f"merge needs (..., C, H, W) tensors; {name!r} has shape {tuple(t.shape)}")
            lead, (c, h, w) = t.shape[:-3], t.shape[-3:]
            x = t.reshape(-1, c, h * w)
            merged, mask, dst = merge_tokens(x, self.ratio, self.mode, (h, w))
            bits.append(pack_merge_map(mask, dst, plan_merge(h * w, self.ratio, self.mode), (h, w)))
            out[name] = merged.reshape(*lead, c, merged.shape[-1])
            shapes.append(f"{name}:{h}x{w}")
        ctx.params[SHAPES_PARAM] = ";".join(shapes)
        ctx.params[RATIO_PARAM] = repr(self.ratio)
        if self.mode != "global":  # the default is not spelled out: header bytes count as side information
            ctx.params[MAP_PARAM] = self.mode
        all_bits = np.concatenate(bits) if bits else np.zeros(0, np.uint8)
        if all_bits.size:
            ctx.side["merge"] = np.packbits(all_bits).tobytes()
        return out

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        ratio = _parse_ratio(ctx.params)
        mode = _parse_map(ctx.params)
        shapes = _parse_shapes(ctx.params.get(SHAPES_PARAM, ""))
        blob = ctx.side.get("merge", b"")
        plans, batches = {}, {}
        for name, t in tensors.items():
            if name not in shapes:
                raise CodecError(f"codec param '{SHAPES_PARAM}' lacks tensor {name!r}")
            if t.dim() < 2:
                raise CodecError(f"merged tensor {name!r} has shape {tuple(t.shape)}, expected (..., C, T)")
            h, w = shapes[name]
            plans[name] = plan_merge(h * w, ratio, mode)
            if t.shape[-1] != plans[name].n_out:
                raise CodecError(f"merged tensor {name!r} has {t.shape[-1]} tokens, expected {plans[name].n_out}")
            batches[name] = int(np.prod(t.shape[:-2])) if t.dim() > 2 else 1
        total_bits = sum(plans[n].side_bits * batches[n] for n in tensors)
        if len(blob) != (total_bits + 7) // 8:
            raise CodecError(f"merge side information has {len(blob)} bytes, expected {(total_bits + 7) // 8}")
        bits = np.unpackbits(np.frombuffer(blob, dtype=np.uint8))[:total_bits]
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for name, t in tensors.items():
            plan, batch = plans[name], batches[name]
            n_bits = plan.side_bits * batch
            h, w = shapes[name]
            mask, dst = unpack_merge_map(bits[pos:pos + n_bits], batch, plan, (h, w))
            pos += n_bits
            c = t.shape[-2]
            x = unmerge_tokens(t.reshape(batch, c, plan.n_out), mask, dst)
            out[name] = x.reshape(*t.shape[:-2], c, h, w)
        return out

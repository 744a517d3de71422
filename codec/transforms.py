"""Distribution transforms applied to latent features before a learned source coder.

Learned coders (CompressAI's) were designed for natural images in [0, 1]; diffusion latents are instead
peaky, heavy-tailed and model specific. These stages map features into [0, 1] so one coder family fits
many generators:

``identity``
    No transform: the baseline every other transform is compared against.
``fcm``
    The FCM-LM baseline: truncate to a fitted range [lo, hi] (0.1/99.9 percentiles of sampled features),
    then min-max scale to [0, 1].
``dtufc``
    DT-UFC's peaky-to-balanced transform: a 1-D K-means codebook of 2^b centres fitted once per model;
    a value maps to the index of the largest centre <= it, divided by 2^b. The output is roughly uniform
    on [0, 1), which a learned coder trained on one model transfers to another. This is the upstream-faithful
    form (floor forward, centre lookup back; its coders train with the loss in the index domain).
``dtufc-clip``
    The same transform with centres fitted after clipping the samples to the FCM range (upstream's ``trun``
    option): the outer centres no longer chase the rare tails, so the inverse is less steep there.
``dtufc-pwl``
    The same centres used as the knots of a piecewise-linear map: x between centres i and i+1 maps to
    (i + fraction) / (2^b - 1), extrapolated linearly past the outer centres. It is invertible (the transform
    alone round-trips exactly) and differentiable, so its coders train with the loss in feature units through
    the inverse instead of in the index domain.

Fitted parameters live in the model's image codec set (``<model dir>/codecs/image-k0``, :mod:`codec.image_sets`),
which the edge and the device pass as ``weights_dir``. A header param may name a set inside it
(``fcm_stats=shapes_v1``, ``dtufc_centres=shapes_v1``; default: the set's own name); names are validated and
resolved inside that folder only, never taken as paths from a request.
"""

from __future__ import annotations

import json
import logging
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from codec.base import CodecError, StageContext, TensorStage
from codec.image_sets import default_set_name, resolve_set_file
from codec.registry import register_stage

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_weights_file(name: str, prefix: str, suffix: str, weights_dir: Path | None = None) -> Path:
    """The file ``{prefix}{name}{suffix}`` inside the image codec set ``weights_dir``.

    Why so strict: ``name`` arrives in a stream header. It must be a bare identifier (no separators, no
    ``..``) and the file must be one the set's config.json lists (with its hash), so a header can select a
    fitted set but never make the device open an arbitrary path. There is no global fallback folder: a codec
    only ever reads the set of the model it serves.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise CodecError(f"invalid weights set name {name!r} (letters, digits, '_', '-', '.' only)")
    return resolve_set_file(weights_dir, f"{prefix}{name}{suffix}")


def set_param(params: dict[str, str], key: str, weights_dir: Path | None) -> str:
    """The set name header param ``key`` selects, else the set's own name (config.json's ``set_name``)."""
    return params[key] if key in params else default_set_name(weights_dir)


def _float_param(params: dict[str, str], key: str) -> float | None:
    if key not in params or params[key] == "":
        return None
    try:
        value = float(params[key])
    except (TypeError, ValueError) as exc:
        raise CodecError(f"codec param {key!r} must be a number, got {params[key]!r}") from exc
    if not math.isfinite(value):
        raise CodecError(f"codec param {key!r} must be finite, got {params[key]!r}")
    return value


@register_stage("identity")
class IdentityStage(TensorStage):
    """Passes tensors through unchanged (the "no transform" baseline)."""

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params, weights_dir

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return dict(tensors)

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return dict(tensors)


# ----------------------------------------------------------------------------------------------- FCM


@lru_cache(maxsize=16)
def _load_fcm_stats(path: Path) -> tuple[float, float]:
    try:
        data = json.loads(path.read_text())
        lo, hi = float(data["lo"]), float(data["hi"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"FCM stats file {path.name} is unreadable: {exc}") from exc
    return lo, hi


def fit_fcm_range(samples: torch.Tensor, lower_pct: float = 0.1, upper_pct: float = 99.9) -> tuple[float, float]:
    """FCM's truncation range: the given percentiles of sampled feature values."""
    flat = samples.detach().reshape(-1).double().numpy()
    lo, hi = np.percentile(flat, [lower_pct, upper_pct])
    return float(lo), float(hi)


def save_fcm_stats(path: Path, lo: float, hi: float, **extra: object) -> None:
    path.write_text(json.dumps({"lo": lo, "hi": hi, **extra}, indent=2) + "\n")


def fcm_forward(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """FCM-LM's map: clamp to [lo, hi], min-max scale to [0, 1]."""
    return (x.clamp(lo, hi) - lo) / (hi - lo)


def fcm_inverse(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return u.clamp(0.0, 1.0) * (hi - lo) + lo


@register_stage("fcm")
class FcmStage(TensorStage):
    """FCM-LM baseline: clamp to [lo, hi], scale to [0, 1].

    Params: ``fcm_stats`` (fitted set name, default: the codec set's own) or explicit ``fcm_lo``/``fcm_hi``,
    which win over the set. Both ends of the pipeline build the same range from the header, so nothing per
    request is sent.
    """

    request_params = ("fcm_stats", "fcm_lo", "fcm_hi")
    uses_codec_set = True

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        lo, hi = _float_param(params, "fcm_lo"), _float_param(params, "fcm_hi")
        if lo is None or hi is None:
            path = resolve_weights_file(set_param(params, "fcm_stats", weights_dir), "fcm_", ".json", weights_dir)
            set_lo, set_hi = _load_fcm_stats(path)
            lo = set_lo if lo is None else lo
            hi = set_hi if hi is None else hi
        if not hi > lo:
            raise CodecError(f"FCM range must have hi > lo, got [{lo}, {hi}]")
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return {k: fcm_forward(v, self.lo, self.hi) for k, v in tensors.items()}

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return {k: fcm_inverse(v, self.lo, self.hi) for k, v in tensors.items()}


# -------------------------------------------------------------------------------------------- DT-UFC


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 60) -> torch.Tensor:
    """Lloyd's K-means in one dimension, exact assignment via sorted midpoints.

    Why not sklearn: 1-D K-means is a sort plus ``searchsorted``; this keeps the fit dependency free and
    deterministic (initialised at the quantiles, so runs are reproducible without a seed).
    """
    x = torch.sort(values.detach().reshape(-1).double()).values
    if x.numel() < k:
        raise ValueError(f"need at least {k} samples to fit {k} centres, got {x.numel()}")
    centres = torch.quantile(x[:: max(1, x.numel() // 1_000_000)], (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        mids = (centres[1:] + centres[:-1]) / 2
        assign = torch.searchsorted(mids, x)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, x)
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if torch.allclose(new, centres, rtol=0, atol=1e-9):
            centres = new
            break
        centres = new
    centres = torch.sort(centres).values
    # Strictly increasing centres keep forward/inverse well defined (duplicates would waste indices).
    eps = max(1e-6, float(centres.abs().max()) * 1e-6)
    for i in range(1, k):
        if centres[i] <= centres[i - 1]:
            centres[i] = centres[i - 1] + eps
    return centres.float()


def fit_dtufc_centres(samples: torch.Tensor, bits: int = 8, groups: int = 1) -> torch.Tensor:
    """Centres (groups, 2^bits) fitted on feature samples (N, C, H, W); channel c uses group c // (C/groups)."""
    if samples.dim() != 4:
        raise ValueError("samples must be (N, C, H, W)")
    c = samples.shape[1]
    if c % groups:
        raise ValueError(f"{groups} groups do not divide {c} channels")
    per = c // groups
    return torch.stack([kmeans_1d(samples[:, g * per:(g + 1) * per], 1 << bits) for g in range(groups)])


def save_dtufc_centres(path: Path, centres: torch.Tensor) -> None:
    save_file({"centres": centres.contiguous().float()}, str(path))


@lru_cache(maxsize=16)
def _load_centres(path: Path) -> torch.Tensor:
    try:
        centres = load_file(str(path))["centres"].float()
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise CodecError(f"DT-UFC centres file {path.name} is unreadable: {exc}") from exc
    if centres.dim() != 2 or not torch.isfinite(centres).all() or not (centres[:, 1:] > centres[:, :-1]).all():
        raise CodecError(f"DT-UFC centres file {path.name} does not hold sorted finite centres")
    return centres


def dtufc_index_forward(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Upstream DT-UFC forward for one codebook (L,): index of the largest centre <= x, over L, in [0, 1)."""
    levels = centres.numel()
    idx = torch.searchsorted(centres, x.contiguous(), right=True) - 1
    return idx.clamp(0, levels - 1).float() / levels


def dtufc_index_inverse(u: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Upstream DT-UFC inverse: the centre at round(u * L)."""
    levels = centres.numel()
    u = torch.nan_to_num(u.float(), nan=0.0, posinf=1.0, neginf=0.0)
    return centres[torch.round(u * levels).clamp(0, levels - 1).long()]


def pwl_forward(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear DT-UFC forward (module docstring): centre i maps to i / (L - 1); differentiable in x."""
    levels = centres.numel()
    seg = (torch.searchsorted(centres, x.detach().contiguous(), right=True) - 1).clamp(0, levels - 2)
    c0, c1 = centres[seg], centres[seg + 1]
    return (seg.to(x.dtype) + (x - c0) / (c1 - c0)) / (levels - 1)


def pwl_inverse(u: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pwl_forward`; differentiable in u (the training loss in feature units uses it)."""
    levels = centres.numel()
    u = torch.nan_to_num(u, nan=0.0, posinf=1.0, neginf=0.0)
    t = u * (levels - 1)
    seg = torch.floor(t.detach()).long().clamp(0, levels - 2)
    c0, c1 = centres[seg], centres[seg + 1]
    return c0 + (t - seg.to(u.dtype)) * (c1 - c0)


@register_stage("dtufc")
class DtufcStage(TensorStage):
    """DT-UFC: value -> (index of the largest centre <= value) / 2^b; inverse -> the centre at that index.

    Params: ``dtufc_centres`` (fitted set name, default: the codec set's own); optional ``dtufc_bits`` must match
    the set (it guards against a device holding a different codebook than the edge). Values below the
    smallest centre map to index 0. Tensors are seen as (..., C, H, W); with G groups of centres, channel c
    uses group c // (C / G).
    """

    request_params = ("dtufc_centres", "dtufc_bits")
    uses_codec_set = True
    #: Centres file of the set: ``<prefix><set>.safetensors``.
    file_prefix = "dtufc_"

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        path = resolve_weights_file(set_param(params, "dtufc_centres", weights_dir), self.file_prefix,
                                    ".safetensors", weights_dir)
        self.centres = _load_centres(path)
        self.levels = int(self.centres.shape[1])
        if "dtufc_bits" in params:
            try:
                bits = int(params["dtufc_bits"])
            except ValueError as exc:
                raise CodecError(f"codec param 'dtufc_bits' must be an integer, got {params['dtufc_bits']!r}") from exc
            if not 0 < bits < 31 or (1 << bits) != self.levels:
                raise CodecError(f"dtufc_bits={bits} does not match the {self.levels} fitted centres")

    def _group_of_channels(self, t: torch.Tensor) -> torch.Tensor:
        """Per-element group index broadcastable to ``t``."""
        groups = self.centres.shape[0]
        if groups == 1:
            return torch.zeros((), dtype=torch.long)
        if t.dim() < 3 or t.shape[-3] % groups:
            raise CodecError(f"DT-UFC set has {groups} channel groups; tensor shape {tuple(t.shape)} does not fit")
        per = t.shape[-3] // groups
        return (torch.arange(t.shape[-3]) // per).view(-1, 1, 1)

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if self.centres.shape[0] == 1:
                out[name] = dtufc_index_forward(t, self.centres[0])
                continue
            idx = torch.empty(t.shape, dtype=torch.long)
            gb = self._group_of_channels(t).expand(t.shape)
            for gi in range(self.centres.shape[0]):
                mask = gb == gi
                idx[mask] = torch.searchsorted(self.centres[gi], t[mask].contiguous(), right=True) - 1
            out[name] = idx.clamp(0, self.levels - 1).float() / self.levels
        return out

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            t = torch.nan_to_num(t.float(), nan=0.0, posinf=1.0, neginf=0.0)
            idx = torch.round(t * self.levels).clamp(0, self.levels - 1).long()
            g = self._group_of_channels(t).expand(t.shape)
            out[name] = self.centres[g, idx] if self.centres.shape[0] > 1 else self.centres[0][idx]
        return out


@register_stage("dtufc-clip")
class DtufcClipStage(DtufcStage):
    """DT-UFC with centres fitted on FCM-clipped samples (upstream ``trun``); centres file ``dtufcclip_<set>``.

    The transform itself is the upstream one (values past the outer centres map to the outer indices)."""

    file_prefix = "dtufcclip_"


@register_stage("dtufc-pwl")
class DtufcPwlStage(DtufcStage):
    """DT-UFC's centres as knots of an invertible piecewise-linear map (module docstring); one codebook only."""

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        super().__init__(params, weights_dir)
        if self.centres.shape[0] != 1:
            raise CodecError("dtufc-pwl needs a single DT-UFC codebook (fitted with groups=1)")

    def forward(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return {name: pwl_forward(t.float(), self.centres[0]) for name, t in tensors.items()}

    def inverse(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> dict[str, torch.Tensor]:
        return {name: pwl_inverse(t.float(), self.centres[0]) for name, t in tensors.items()}

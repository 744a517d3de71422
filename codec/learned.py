"""Learned source coders (terminal ``learned``) built on CompressAI, sized for diffusion latents.

Four families, chosen by the header param ``learned_model``:

``factorized``    Balle 2018 factorized prior (``compressai.models.FactorizedPrior``: EntropyBottleneck on y)
``hyperprior``    Balle 2018 scale hyperprior (``ScaleHyperprior``)
``mshyperprior``  Minnen 2018 mean-scale hyperprior (``MeanScaleHyperprior``, no autoregressive context)
``elic``          He 2022 ELIC (``Elic2022Official``: uneven channel groups + checkerboard spatial context)
``gained``        variable rate: one mean-scale hyperprior for all qualities, chosen by gain vectors
                  (:mod:`codec.variable_rate`), at real width (N=64, M=96); trained by :mod:`codec.train_gained`
``gained-native`` the same on the latent's own channels (``tile_mode=native``: 4x16x16 in, not one 32x32
                  plane), so the analysis sees each position's channels together; model specific, not universal

Why compact variants: CompressAI's image models downsample 16x in g_a and 4x more in h_a, which would
turn a 32x32 tiled latent plane into a 2x2 y and a sub-pixel z. Our subclasses keep each family's
entropy model, forward, compress and decompress logic but swap in shallow transforms: g_a downsamples
4x (two stride-2 5x5 convs with GDN), h_a 4x more (two stride-2 3x3 convs), N=32 and M=16 channels, so
a 32x32 plane gives an 8x8x16 y and a 2x2 z; inputs are replicate-padded to a multiple of
:data:`PAD_MULTIPLE` (16) and cropped after decoding. ELIC keeps its structure with groups
[2, 2, 4, 8] and a 32-wide channel-context net.

Weights are trained per (model, input domain, quality) by :mod:`codec.train_coders` and ship as one
safetensors file plus a JSON of configs per weights set (``learned_<set>.*`` in the model's image codec set,
``<model dir>/codecs/image-k0``, see :mod:`codec.image_sets`); header params ``learned_set`` (default: the
codec set's own name), ``learned_domain`` (identity|fcm|dtufc: what the preceding transform produces)
and ``learned_quality`` (1 = lowest rate) select one. Entropy-coder CDF tables are rebuilt with
``update(force=True)`` at load, from the stored parameters, identically on edge and device.

Payload: ``version(1) | for each tensor, for each string, for each batch item: varint length, bytes |
crc32(4)``. The CRC lets the device reject damaged payloads before the rANS decoder sees them; every
string is also zero-padded before decoding so that even a forged stream with a valid CRC cannot make the
(bounds-unchecked) rANS decoder read past its buffer.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from compressai.layers import GDN
from compressai.models import Elic2022Official, FactorizedPrior, MeanScaleHyperprior, ScaleHyperprior
from compressai.models.utils import conv, deconv
from safetensors.torch import load_file, save_file
from torch import nn

from codec.base import CodecError, SourceCoder, StageContext, TensorInfo
from codec.primitives import read_varint, varint
from codec.registry import register_preset, register_terminal
from codec.transforms import resolve_weights_file, set_param
from codec.variable_rate import GainedMeanScale

log = logging.getLogger(__name__)

MODEL_KINDS: tuple[str, ...] = ("factorized", "hyperprior", "mshyperprior", "elic", "gained", "gained-native")
#: The variable-rate kinds (one model, the quality picks a gain).
GAINED_KINDS: tuple[str, ...] = ("gained", "gained-native")
#: The per-quality families (one model per quality, :mod:`codec.train_coders`); ``gained`` is variable rate.
COMPACT_KINDS: tuple[str, ...] = MODEL_KINDS[:4]
DOMAINS: tuple[str, ...] = ("identity", "fcm", "dtufc", "dtufc-clip", "dtufc-pwl")
#: Total downsampling of g_a (4x) times h_a (4x): inputs are padded to a multiple of this.
PAD_MULTIPLE: int = 16
_VERSION = 1
_MAX_POINTS = 1 << 24


@dataclass(frozen=True)
class CoderConfig:
    """Architecture of one compact coder (stored in the weights JSON)."""

    kind: str
    in_ch: int = 1
    N: int = 32
    M: int = 16
    groups: tuple[int, ...] = (2, 2, 4, 8)
    #: Qualities one model serves (``gained`` only; the other families train one model per quality).
    levels: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_ch": self.in_ch, "N": self.N, "M": self.M, "groups": list(self.groups),
                "levels": self.levels}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CoderConfig":
        return CoderConfig(str(d["kind"]), int(d["in_ch"]), int(d["N"]), int(d["M"]), tuple(int(g) for g in d["groups"]),
                           int(d.get("levels", 1)))


def _g_a(cin: int, N: int, M: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, N, 5, 2), GDN(N), conv(N, N, 3, 1), GDN(N), conv(N, M, 5, 2))


def _g_s(cout: int, N: int, M: int) -> nn.Sequential:
    return nn.Sequential(deconv(M, N, 5, 2), GDN(N, inverse=True), conv(N, N, 3, 1), GDN(N, inverse=True),
                         deconv(N, cout, 5, 2))


def _h_a(M: int, N: int) -> nn.Sequential:
    return nn.Sequential(conv(M, N, 3, 1), nn.ReLU(inplace=True), conv(N, N, 3, 2), nn.ReLU(inplace=True),
                         conv(N, N, 3, 2))


def _h_s(N: int, out: int, final_relu: bool) -> nn.Sequential:
    layers: list[nn.Module] = [deconv(N, N, 3, 2), nn.ReLU(inplace=True), deconv(N, N, 3, 2), nn.ReLU(inplace=True),
                               conv(N, out, 3, 1)]
    if final_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class CompactFactorized(FactorizedPrior):
    """FactorizedPrior with 4x-downsampling transforms for latent planes."""

    def __init__(self, cfg: CoderConfig) -> None:
        super().__init__(cfg.N, cfg.M)
        self.g_a, self.g_s = _g_a(cfg.in_ch, cfg.N, cfg.M), _g_s(cfg.in_ch, cfg.N, cfg.M)


class CompactHyperprior(ScaleHyperprior):
    """ScaleHyperprior with shallow g_a/g_s/h_a/h_s (y at 1/4, z at 1/16 resolution)."""

    def __init__(self, cfg: CoderConfig) -> None:
        super().__init__(cfg.N, cfg.M)
        self.g_a, self.g_s = _g_a(cfg.in_ch, cfg.N, cfg.M), _g_s(cfg.in_ch, cfg.N, cfg.M)
        self.h_a, self.h_s = _h_a(cfg.M, cfg.N), _h_s(cfg.N, cfg.M, final_relu=True)


class CompactMeanScale(MeanScaleHyperprior):
    """MeanScaleHyperprior with shallow transforms; h_s predicts means and scales (2M channels)."""

    def __init__(self, cfg: CoderConfig) -> None:
        super().__init__(cfg.N, cfg.M)
        self.g_a, self.g_s = _g_a(cfg.in_ch, cfg.N, cfg.M), _g_s(cfg.in_ch, cfg.N, cfg.M)
        self.h_a, self.h_s = _h_a(cfg.M, cfg.N), _h_s(cfg.N, 2 * cfg.M, final_relu=False)


class CompactElic(Elic2022Official):
    """Elic2022Official's latent codec (channel groups + checkerboard) with shallow transforms."""

    def __init__(self, cfg: CoderConfig) -> None:
        super().__init__(N=cfg.N, M=cfg.M, groups=list(cfg.groups))
        N, M, groups = cfg.N, cfg.M, list(cfg.groups)
        self.g_a, self.g_s = _g_a(cfg.in_ch, N, M), _g_s(cfg.in_ch, N, M)
        hyper = self.latent_codec["hyper"]
        hyper.h_a = _h_a(M, N)
        hyper.h_s = _h_s(N, 2 * N, final_relu=False)  # ELIC's param aggregation expects 2N hyper channels
        ctx = self.latent_codec["y"].channel_context
        for k in range(1, len(groups)):
            ctx[f"y{k}"] = nn.Sequential(conv(sum(groups[:k]), N, 3, 1), nn.ReLU(inplace=True),
                                         conv(N, groups[k] * 2, 3, 1))


def _gained(cfg: CoderConfig) -> GainedMeanScale:
    return GainedMeanScale(cfg.N, cfg.M, cfg.levels, _g_a(cfg.in_ch, cfg.N, cfg.M), _g_s(cfg.in_ch, cfg.N, cfg.M),
                           _h_a(cfg.M, cfg.N), _h_s(cfg.N, 2 * cfg.M, final_relu=False))


_CLASSES: dict[str, Callable[[CoderConfig], nn.Module]] = {
    "factorized": CompactFactorized, "hyperprior": CompactHyperprior,
    "mshyperprior": CompactMeanScale, "elic": CompactElic, "gained": _gained, "gained-native": _gained,
}


def build_model(cfg: CoderConfig) -> nn.Module:
    """A fresh, untrained compact coder of the configured family."""
    if cfg.kind not in _CLASSES:
        raise CodecError(f"unknown learned model {cfg.kind!r}; known: {', '.join(MODEL_KINDS)}")
    return _CLASSES[cfg.kind](cfg)


def pad_to_multiple(x: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Replicate-pad H and W up to a multiple (replicate, not zeros: no artificial edges to code)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def model_key(kind: str, domain: str, quality: int) -> str:
    return f"{kind}.{domain}.q{quality}"


def _is_buffer_key(key: str) -> bool:
    return any(key.endswith(b) for b in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"))


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters to ship: float16 for transform weights (halves the size), float32 for entropy models.

    CDF tables are left out (they are large and rebuilt from these by ``update(force=True)``).
    """
    out = {}
    for key, value in model.state_dict().items():
        if _is_buffer_key(key):
            continue
        keep32 = "entropy_bottleneck" in key or not value.is_floating_point()
        out[key] = value.detach().clone().contiguous() if keep32 else value.detach().half().contiguous()
    return out


def load_exported(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load an :func:`export_state` dict, rebuild CDFs, switch to eval."""
    full = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = nn.Module.load_state_dict(model, full, strict=False)
    missing = [k for k in missing if not _is_buffer_key(k)]
    if missing or unexpected:
        raise CodecError(f"learned weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.update(force=True)
    return model.eval()


def round_trip_half(model: nn.Module) -> nn.Module:
    """Make a trained model equal to what :func:`export_state` ships (so measured numbers are the shipped ones)."""
    return load_exported(model, export_state(model))


@lru_cache(maxsize=8)
def _read_set(weights_path: Path, json_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        meta = json.loads(json_path.read_text())
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors / json raise several types on damaged files
        raise CodecError(f"learned weights set {weights_path.name} is unreadable: {exc}") from exc
    return meta, tensors


@lru_cache(maxsize=64)
def load_coder(set_name: str, kind: str, domain: str, quality: int, weights_dir: Path | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """The trained coder ``kind.domain.q<quality>`` of a shipped weights set, ready to code, plus its metadata."""
    weights_path = resolve_weights_file(set_name, "learned_", ".safetensors", weights_dir)
    json_path = resolve_weights_file(set_name, "learned_", ".json", weights_dir)
    meta, tensors = _read_set(weights_path, json_path)
    key = model_key(kind, domain, quality)
    entry = meta.get("models", {}).get(key)
    if entry is None:
        raise CodecError(f"weights set {set_name!r} has no coder {key!r}")
    # A variable-rate model's qualities share one state (``state``) and differ by ``quality_index``.
    prefix = str(entry.get("state", key)) + "."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    model = load_exported(build_model(CoderConfig.from_json(entry["config"])), state)
    if isinstance(model, GainedMeanScale):
        return model.at_quality(int(entry.get("quality_index", quality - 1))).eval(), entry
    return model, entry


# ------------------------------------------------------------------------------------- model coding


def _latent_shapes(model: nn.Module, kind: str, h: int, w: int) -> Any:
    """The ``shape`` argument each family's decompress needs, from the padded input size alone."""
    yh, yw, zh, zw = h // 4, w // 4, h // 16, w // 16
    if kind == "factorized":
        return (yh, yw)
    if kind in ("hyperprior", "mshyperprior", *GAINED_KINDS):
        return (zh, zw)
    groups = model.groups
    return {"y": [(g, yh, yw) for g in groups], "hyper": (zh, zw)}


def _n_strings(model: nn.Module, kind: str) -> int:
    return {"factorized": 1, "hyperprior": 2, "mshyperprior": 2, "gained": 2, "gained-native": 2}.get(
        kind, 2 * len(getattr(model, "groups", [])) + 1)


@torch.no_grad()
def encode_planes(model: nn.Module, kind: str, x: torch.Tensor) -> list[list[bytes]]:
    """(B, C, H, W) -> strings[stream][batch] using the model's own compress()."""
    out = model.compress(pad_to_multiple(x))
    return [list(s) for s in out["strings"]]


@torch.no_grad()
def decode_planes(model: nn.Module, kind: str, strings: list[list[bytes]], shape: tuple[int, int, int, int]
                  ) -> torch.Tensor:
    """Inverse of :func:`encode_planes`, without CompressAI's clamp to [0, 1] (identity-domain features are
    not in [0, 1])."""
    b, c, h, w = shape
    ph, pw = h + (-h) % PAD_MULTIPLE, w + (-w) % PAD_MULTIPLE
    shp = _latent_shapes(model, kind, ph, pw)
    if kind == "factorized":
        y_hat = model.entropy_bottleneck.decompress(strings[0], shp)
    elif kind == "hyperprior":
        z_hat = model.entropy_bottleneck.decompress(strings[1], shp)
        indexes = model.gaussian_conditional.build_indexes(model.h_s(z_hat))
        y_hat = model.gaussian_conditional.decompress(strings[0], indexes, z_hat.dtype)
    elif kind in GAINED_KINDS:
        return model.decode_padded(strings, shp)[..., :h, :w]
    elif kind == "mshyperprior":
        z_hat = model.entropy_bottleneck.decompress(strings[1], shp)
        scales_hat, means_hat = model.h_s(z_hat).chunk(2, 1)
        indexes = model.gaussian_conditional.build_indexes(scales_hat)
        y_hat = model.gaussian_conditional.decompress(strings[0], indexes, means=means_hat)
    else:
        y_hat = model.latent_codec.decompress(strings, shp)["y_hat"]
    return model.g_s(y_hat)[..., :h, :w]


@torch.no_grad()
def reference_reconstruction(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own quantised reconstruction (eval-mode forward) that a decoded bitstream must equal."""
    h, w = x.shape[-2:]
    return model(pad_to_multiple(x))["x_hat"][..., :h, :w]


# ------------------------------------------------------------------------------------------ payload


def _int_param(params: dict[str, str], key: str, default: str) -> int:
    try:
        return int(params.get(key, default))
    except (TypeError, ValueError) as exc:
        raise CodecError(f"codec param {key!r} must be an integer, got {params.get(key)!r}") from exc


@register_terminal("learned")
class LearnedCoder(SourceCoder):
    """A trained CompressAI coder selected by header params; tensors must be (B, in_ch, H, W) planes."""

    request_params = ("learned_model", "learned_domain", "learned_quality", "learned_set")
    uses_codec_set = True

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        self.kind = params.get("learned_model", "hyperprior")
        if self.kind not in MODEL_KINDS:
            raise CodecError(f"codec param 'learned_model' must be one of {MODEL_KINDS}, got {self.kind!r}")
        self.domain = params.get("learned_domain", "identity")
        if self.domain not in DOMAINS:
            raise CodecError(f"codec param 'learned_domain' must be one of {DOMAINS}, got {self.domain!r}")
        self.quality = _int_param(params, "learned_quality", "2")
        if not 1 <= self.quality <= 16:
            raise CodecError(f"codec param 'learned_quality' must be in [1, 16], got {self.quality}")
        self.set_name = set_param(params, "learned_set", weights_dir)
        self.model, self.meta = load_coder(self.set_name, self.kind, self.domain, self.quality, weights_dir)
        self.in_ch = int(self.meta["config"]["in_ch"])
        self.n_strings = _n_strings(self.model, self.kind)

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        if len(shape) != 4 or shape[1] != self.in_ch:
            raise CodecError(f"learned coder needs (B, {self.in_ch}, H, W) tensors; {name!r} is {shape} "
                             "(put a 'tile' stage before it)")
        if math.prod(shape) > _MAX_POINTS:
            raise CodecError(f"tensor {name!r} of shape {shape} is over the learned coder's size limit")
        return shape  # type: ignore[return-value]

    def compress(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> bytes:
        out = bytearray([_VERSION])
        for name, t in tensors.items():
            self._check_shape(name, tuple(int(s) for s in t.shape))
            strings = encode_planes(self.model, self.kind, t.float())
            if len(strings) != self.n_strings:
                raise CodecError(f"internal: {self.kind} produced {len(strings)} streams, expected {self.n_strings}")
            for group in strings:
                for s in group:
                    out += varint(len(s)) + s
        out += zlib.crc32(out).to_bytes(4, "little")
        return bytes(out)

    def decompress(self, data: bytes, infos: list[TensorInfo], ctx: StageContext) -> dict[str, torch.Tensor]:
        if len(data) < 5:
            raise CodecError(f"learned payload of {len(data)} bytes is truncated")
        end = len(data) - 4
        if zlib.crc32(data[:end]).to_bytes(4, "little") != data[end:]:
            raise CodecError("learned payload fails its CRC check (corrupt or truncated)")
        if data[0] != _VERSION:
            raise CodecError(f"learned payload version {data[0]} is not supported (expected {_VERSION})")
        pos, out = 1, {}
        for info in infos:
            b, c, h, w = self._check_shape(info.name, info.shape)
            ph, pw = h + (-h) % PAD_MULTIPLE, w + (-w) % PAD_MULTIPLE
            # Upper bound on what a rANS decoder may read for one stream (see module docstring).
            symbols = (ph // 4) * (pw // 4) * self.model_M + (ph // 16) * (pw // 16) * self.model_N
            strings: list[list[bytes]] = []
            for _ in range(self.n_strings):
                group = []
                for _ in range(b):
                    n, pos = read_varint(data, pos, end, 35, "learned payload: malformed or truncated length field")
                    if pos + n > end:
                        raise CodecError(f"learned payload for {info.name!r} is truncated")
                    group.append(data[pos:pos + n] + bytes(4 * symbols + 16 * n + 64))
                    pos += n
                strings.append(group)
            try:
                x = decode_planes(self.model, self.kind, strings, (b, c, h, w))
            except (RuntimeError, ValueError, AssertionError, IndexError, OverflowError) as exc:
                raise CodecError(f"learned stream of tensor {info.name!r} does not decode: {exc}") from exc
            if not torch.isfinite(x).all():
                raise CodecError(f"learned stream of tensor {info.name!r} decodes to non-finite values")
            out[info.name] = x
        if pos != end:
            raise CodecError(f"learned payload has {end - pos} unexpected trailing bytes")
        return out

    @property
    def model_M(self) -> int:
        return int(self.meta["config"]["M"])

    @property
    def model_N(self) -> int:
        return int(self.meta["config"]["N"])


def save_weights_set(path_stem: Path, models: dict[str, tuple[nn.Module, CoderConfig, dict[str, Any]]],
                     extra: dict[str, Any]) -> None:
    """Write the per-quality coders ``models`` (keyed by :func:`model_key`) into ``<stem>.safetensors/.json``,
    keeping the other coders already there (:func:`merge_weights_set`); ``extra`` goes to the JSON's top level."""
    states = {key: export_state(model) for key, (model, _, _) in models.items()}
    entries = {key: {"config": cfg.to_json(), **info} for key, (_, cfg, info) in models.items()}
    merge_weights_set(path_stem, states, entries, extra, extra_key=None)


def merge_weights_set(path_stem: Path, states: dict[str, dict[str, torch.Tensor]], entries: dict[str, dict[str, Any]],
                      extra: dict[str, Any], extra_key: str | None = "variable_rate") -> None:
    """Add coders to ``<stem>.safetensors/.json`` (created when missing), replacing those of the same state keys.

    ``states`` maps a state key (e.g. ``gained.fcm``) to an :func:`export_state` dict; ``entries`` maps each
    coder key (``gained.fcm.q3``) to its metadata, which names its ``state``. Other coders are kept, so a set
    can hold the per-quality families and a variable-rate one side by side. (A per-quality coder is its own
    state: its entry has no ``state`` field.)
    """
    st_path, js_path = path_stem.with_suffix(".safetensors"), path_stem.with_suffix(".json")
    tensors = load_file(str(st_path)) if st_path.is_file() else {}
    meta: dict[str, Any] = json.loads(js_path.read_text()) if js_path.is_file() else {"format": 1, "models": {}}
    tensors = {k: v for k, v in tensors.items() if not any(k.startswith(s + ".") for s in states)}
    for skey, state in states.items():
        tensors.update({f"{skey}.{k}": v for k, v in state.items()})
    meta["models"] = {k: v for k, v in meta.get("models", {}).items() if v.get("state", k) not in states}
    meta["models"].update(entries)
    if extra_key is None:
        meta.update(extra)
    else:
        meta.setdefault(extra_key, {}).update(extra)
    save_file(tensors, str(st_path))
    js_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    _read_set.cache_clear()
    load_coder.cache_clear()


def _register_presets() -> None:
    """Presets: each compact family on untransformed latents at quality 2, and the variable-rate coder behind
    every transform (the transforms are studied on it: ``meg bench rate``, ``meg bench universal``)."""
    names = {"factorized": "factorized prior", "hyperprior": "scale hyperprior",
             "mshyperprior": "mean-scale hyperprior", "elic": "ELIC"}
    for kind, title in names.items():
        register_preset(kind, "identity+tile+learned", f"Learned {title} coder on tiled latents (digital)",
                        learned_model=kind, learned_domain="identity", learned_quality="2")
    # The variable-rate family (learned_quality 1-4 picks the gain), with every transform of issue 13.
    gained = {"identity": ("gained", "no transform"), "fcm": ("fcm+gained", "FCM clip + min-max"),
              "dtufc": ("dtufc+gained", "DT-UFC, upstream-faithful (index-domain loss)"),
              "dtufc-clip": ("dtufc-clip+gained", "DT-UFC with centres fitted on FCM-clipped features"),
              "dtufc-pwl": ("dtufc-pwl+gained", "DT-UFC as a piecewise-linear map (feature-domain loss)")}
    for domain, (name, what) in gained.items():
        register_preset(name, f"{domain}+tile+learned",
                        f"{what} + variable-rate mean-scale hyperprior (N=64, M=96) on tiled latents (digital)",
                        learned_model="gained", learned_domain=domain, learned_quality="2")
    register_preset("gained-native", "identity+tile+learned",
                    "Variable-rate mean-scale hyperprior (N=64, M=96) on the latent's own channels (digital)",
                    tile_mode="native", learned_model="gained-native", learned_domain="identity", learned_quality="2")


_register_presets()

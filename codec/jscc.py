"""``jscc``: a learned, SNR-adaptive analog joint source-channel coder (the E2E-MEG-DT terminal).

Why: the linear ``analog`` mapper sends every latent value as-is, so the symbol count is fixed at half the value
count and the noise lands directly on the latent. A learned encoder can spend fewer channel uses (bandwidth
ratio < 0.5 complex symbols per value), shape the symbols so that noise hurts the decoded *image* least, and
adapt to the link: the SNR is side information (header param ``jscc_snr_db``, filled from the request's
channel, ``channel_snr_db``, when the caller does not set it) that modulates every layer of both ends
(FiLM: per-channel scale and shift computed from the SNR).

Input: tensors of shape (B, C, T) tokens (after the ``merge`` stage) or (B, C, H, W) latents (read as H·W
tokens in raster order). Architecture: a 1×1 convolution maps each token's C values to ``hidden`` features
(the paper's "1×1 conv to tokens"; it is linear, so it commutes with the merge stage's averaging), dilated
1-D residual convolutions mix neighbouring tokens, and a 1×1 convolution emits ``k`` complex symbols per
token. Each image's symbols are scaled to unit average power (the power constraint). The device's decoder
mirrors it and outputs the tokens, so the usual stages (unmerge) and the device's latent decoder follow.

Weights live in the model's image codec set (``<model dir>/codecs/image-k0/jscc_*.safetensors``, see
:mod:`codec.image_sets`) with their architecture in the safetensors metadata (``config`` JSON); they are trained
by ``meg train codecs --source image --model-dir DIR`` (which runs :mod:`codec.train_jscc`). The runtime imports no channel
model: the channel only exists in training.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from codec.base import AnalogMapper, CodecError, StageContext, TensorInfo
from codec.registry import register_preset, register_terminal
from codec.transforms import resolve_weights_file

MODEL_PARAM = "jscc_model"
SNR_PARAM = "jscc_snr_db"
CHANNEL_SNR_PARAM = "channel_snr_db"
DEFAULT_SNR_DB = 10.0
_MODEL_NAME = re.compile(r"^jscc_[A-Za-z0-9_-]{1,64}$")


class SnrFilm(nn.Module):
    """SNR (dB) → per-block (scale, shift) pairs; the SNR is normalised to about [-1, 1] over the train range."""

    def __init__(self, hidden: int, n_blocks: int, width: int = 64) -> None:
        super().__init__()
        self.hidden, self.n_blocks = hidden, n_blocks
        self.net = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, 2 * hidden * n_blocks))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, snr_db: torch.Tensor) -> torch.Tensor:
        """(B,) dB → (n_blocks, 2, B, hidden, 1)."""
        z = self.net(((snr_db - 7.5) / 12.5)[:, None])
        return z.view(-1, self.n_blocks, 2, self.hidden, 1).permute(1, 2, 0, 3, 4)


class FilmResBlock(nn.Module):
    """x + W2·GELU(FiLM(W1 * x)) with a dilated kernel-3 convolution along the token axis."""

    def __init__(self, hidden: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1d(hidden, hidden, 1)

    def forward(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y * (1.0 + film[0]) + film[1]
        return x + self.proj(nn.functional.gelu(y))


class JsccNet(nn.Module):
    """Encoder and decoder of one JSCC link; ``config`` is all that is needed to rebuild it."""

    def __init__(self, in_channels: int = 4, hidden: int = 64, symbols_per_token: int = 2,
                 dilations: tuple[int, ...] = (1, 2, 4, 8, 1), **meta: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"in_channels": in_channels, "hidden": hidden,
                                       "symbols_per_token": symbols_per_token, "dilations": list(dilations), **meta}
        k = symbols_per_token
        self.enc_in = nn.Conv1d(in_channels, hidden, 1)
        self.enc_blocks = nn.ModuleList(FilmResBlock(hidden, d) for d in dilations)
        self.enc_film = SnrFilm(hidden, len(dilations))
        self.enc_out = nn.Conv1d(hidden, 2 * k, 1)
        self.dec_in = nn.Conv1d(2 * k, hidden, 1)
        self.dec_blocks = nn.ModuleList(FilmResBlock(hidden, d) for d in dilations)
        self.dec_film = SnrFilm(hidden, len(dilations))
        self.dec_out = nn.Conv1d(hidden, in_channels, 1)

    @property
    def in_channels(self) -> int:
        return int(self.config["in_channels"])

    @property
    def symbols_per_token(self) -> int:
        return int(self.config["symbols_per_token"])

    def encode(self, tokens: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
        """(B, C, T) tokens → (B, k·T) complex symbols with unit average power per image."""
        film = self.enc_film(snr_db)
        h = self.enc_in(tokens)
        for i, block in enumerate(self.enc_blocks):
            h = block(h, film[i])
        z = self.enc_out(h)  # (B, 2k, T)
        sym = torch.complex(z[:, 0::2], z[:, 1::2]).reshape(z.shape[0], -1)  # symbol-channel major
        power = sym.abs().pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12)
        return sym / power.sqrt()

    def decode(self, symbols: torch.Tensor, snr_db: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """(B, k·T) received symbols → (B, C, T) token estimates."""
        b, k = symbols.shape[0], self.symbols_per_token
        sym = symbols.reshape(b, k, n_tokens)
        z = torch.stack([sym.real, sym.imag], dim=2).reshape(b, 2 * k, n_tokens).float()
        film = self.dec_film(snr_db)
        h = self.dec_in(z)
        for i, block in enumerate(self.dec_blocks):
            h = block(h, film[i])
        return self.dec_out(h)

    def save(self, path: Path) -> None:
        """Write the weights with the architecture as safetensors metadata."""
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: Path) -> "JsccNet":
        """Rebuild a saved network in eval mode; raises :class:`CodecError` when it is missing or corrupt."""
        if not path.is_file():
            raise CodecError(f"JSCC weights {path} are missing; train them with "
                             f"`meg train codecs --source image --model-dir <model dir>`")
        try:
            with safe_open(str(path), framework="pt") as fh:
                config = json.loads((fh.metadata() or {})["config"])
            net = cls(**{**config, "dilations": tuple(config["dilations"])})
            net.load_state_dict(load_file(str(path)))
        except (KeyError, ValueError, RuntimeError, OSError) as exc:
            raise CodecError(f"JSCC weights {path} cannot be loaded: {exc}") from exc
        return net.eval()


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, C, T) as is, (B, C, H, W) → (B, C, H·W); anything else is rejected."""
    if t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[1], -1)
    if t.dim() == 3:
        return t
    raise CodecError(f"jscc needs (B, C, T) or (B, C, H, W) tensors, got shape {tuple(t.shape)}")


def read_snr_db(params: dict[str, str]) -> float:
    """The SNR the link was coded for: ``jscc_snr_db``, else the request's ``channel_snr_db``, else 10 dB."""
    text = params.get(SNR_PARAM) or params.get(CHANNEL_SNR_PARAM) or str(DEFAULT_SNR_DB)
    try:
        snr = float(text)
    except ValueError as exc:
        raise CodecError(f"codec param '{SNR_PARAM}' must be a number, got {text!r}") from exc
    if not math.isfinite(snr) or not -60.0 <= snr <= 80.0:
        raise CodecError(f"codec param '{SNR_PARAM}' must be a finite dB value in [-60, 80], got {text!r}")
    return snr


@register_terminal("jscc")
class JsccMapper(AnalogMapper):
    """Learned analog JSCC: tokens → ``symbols_per_token`` unit-power complex symbols per token, and back."""

    request_params = (MODEL_PARAM, SNR_PARAM)
    uses_codec_set = True

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        name = params.get(MODEL_PARAM, "jscc_full")
        if not _MODEL_NAME.match(name):
            raise CodecError(f"codec param '{MODEL_PARAM}' must look like 'jscc_<name>', got {name!r}")
        self.model_name = name
        # Only a file config.json lists (and whose hash matches) is opened: never a path from the header.
        self.net = JsccNet.load(resolve_weights_file(name[len("jscc_"):], "jscc_", ".safetensors", weights_dir))
        lo, hi = self.net.config.get("snr_range_db", [-5.0, 20.0])
        self.snr_range = (float(lo), float(hi))

    def _snr_tensor(self, params: dict[str, str], batch: int) -> torch.Tensor:
        # The network was trained over snr_range; beyond it, it sees the nearest trained SNR.
        snr = min(max(read_snr_db(params), self.snr_range[0]), self.snr_range[1])
        return torch.full((batch,), snr, dtype=torch.float32)

    @torch.no_grad()
    def to_symbols(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> np.ndarray:
        ctx.params[SNR_PARAM] = f"{read_snr_db(ctx.params):g}"
        ctx.params[MODEL_PARAM] = self.model_name
        out = []
        for name, t in tensors.items():
            x = as_tokens(t.float())
            if x.shape[1] != self.net.in_channels:
                raise CodecError(f"jscc model {self.model_name!r} takes {self.net.in_channels} channels; "
                                 f"{name!r} has {x.shape[1]}")
            out.append(self.net.encode(x, self._snr_tensor(ctx.params, x.shape[0])).reshape(-1))
        return torch.cat(out).numpy().astype(np.complex64)

    @torch.no_grad()
    def from_symbols(self, symbols: np.ndarray, infos: list[TensorInfo], ctx: StageContext
                     ) -> dict[str, torch.Tensor]:
        k = self.net.symbols_per_token
        expected, plans = 0, []
        for info in infos:
            if len(info.shape) not in (3, 4) or info.shape[1] != self.net.in_channels:
                raise CodecError(f"jscc cannot decode tensor {info.name!r} of shape {info.shape}")
            b, t = info.shape[0], int(np.prod(info.shape[2:]))
            plans.append((info, b, t))
            expected += b * k * t
        symbols = np.asarray(symbols)
        if symbols.ndim != 1 or symbols.size != expected:
            raise CodecError(f"jscc payload has {symbols.size} symbols, expected {expected}")
        rx = torch.from_numpy(np.nan_to_num(symbols.astype(np.complex64)))
        out, pos = {}, 0
        for info, b, t in plans:
            chunk = rx[pos:pos + b * k * t].reshape(b, k * t)
            pos += b * k * t
            tokens = self.net.decode(chunk, self._snr_tensor(ctx.params, b), t)
            out[info.name] = tokens.reshape(info.shape)
        return out


register_preset("jscc", "jscc", "Learned SNR-adaptive analog JSCC on the latent, 0.5 symbols a value",
                jscc_model="jscc_full")
register_preset("e2e-meg", "merge+jscc",
                "E2E-MEG-DT: ToMe merging (ratio 0.5) + learned analog JSCC, 0.25 symbols a latent value",
                merge_ratio="0.5", jscc_model="jscc_e2e")
register_preset("e2e-meg-fixed", "merge+jscc",
                "E2E-MEG with a fixed merge map (each token into its neighbour): no merge map to send",
                merge_ratio="0.5", merge_map="fixed", jscc_model="jscc_e2e_fixed")
register_preset("e2e-meg-learned", "jscc",
                "E2E-MEG with learned merging: the JSCC network maps each latent token to one symbol (0.25 symbols "
                "a value, like e2e-meg) and pools neighbours itself; no merge map to send",
                jscc_model="jscc_e2e_learned")

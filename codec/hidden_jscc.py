"""``jscc-hidden``: a small learned, SNR-adaptive analog JSCC for LLM hidden states, one row (token) at a time.

Why per row: during decoding the edge sends one row of ``d`` values per step, so the code cannot lean on
neighbouring tokens; an MLP maps each row (standardised with the fitted per-dimension mean and std) to
``m`` real values = ``m/2`` complex symbols, scaled to unit average power per row (the power constraint,
and no gain side information), and the device's MLP maps the noisy symbols back to ``d`` values. The SNR
(header ``jscc_snr_db``, else the request's ``channel_snr_db``, as :mod:`codec.jscc` reads it) modulates
both ends through FiLM. Trained by :mod:`codec.fit_hidden` through the project's own channel blocks (AWGN
and Rayleigh, SNR drawn from −20…20 dB) on hidden states of the training corpus; stored in the fitted
codec set (``jscc-hidden.safetensors``: float16 weights, architecture in its metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from codec.base import AnalogMapper, CodecError, StageContext, TensorInfo
from codec.hidden_quant import as_rows, info_rows
from codec.hidden_sets import JSCC_FILE, load_codec_set, stamp_and_check_set
from codec.sets import LLM_SOURCE
from codec.jscc import SNR_PARAM, read_snr_db
from codec.registry import register_preset, register_terminal

SNR_RANGE_DB = (-20.0, 20.0)


class RowFilm(nn.Module):
    """SNR (dB) → (scale, shift) of one hidden layer; zero-initialised, so training starts SNR-blind."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 2 * width))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
        scale, shift = self.net((snr_db / 20.0)[:, None]).chunk(2, dim=-1)
        return h * (1.0 + scale) + shift


class HiddenJsccNet(nn.Module):
    """Row encoder ``d → 2s`` reals (``s`` complex symbols, unit power) and decoder ``2s → d``."""

    def __init__(self, dim: int = 128, symbols: int = 32, width: int = 128, **meta: Any) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"dim": dim, "symbols": symbols, "width": width, **meta}
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.enc_in, self.enc_mid = nn.Linear(dim, width), nn.Linear(width, width)
        self.enc_out = nn.Linear(width, 2 * symbols)
        self.dec_in, self.dec_mid = nn.Linear(2 * symbols, width), nn.Linear(width, width)
        self.dec_out = nn.Linear(width, dim)
        self.enc_film, self.dec_film = RowFilm(width), RowFilm(width)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    @property
    def symbols(self) -> int:
        return int(self.config["symbols"])

    def encode(self, rows: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
        """``(R, d)`` hidden rows → ``(R, s)`` complex symbols, each row of unit average power."""
        x = (rows - self.mean) / self.std
        h = nn.functional.silu(self.enc_in(x))
        h = nn.functional.silu(self.enc_film(self.enc_mid(h), snr_db)) + h
        z = self.enc_out(h)
        sym = torch.complex(z[:, 0::2], z[:, 1::2])
        return sym / sym.abs().pow(2).mean(dim=1, keepdim=True).clamp_min(1e-12).sqrt()

    def decode(self, symbols: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
        """``(R, s)`` received symbols → ``(R, d)`` hidden rows."""
        z = torch.stack([symbols.real, symbols.imag], dim=-1).reshape(symbols.shape[0], -1).float()
        h = nn.functional.silu(self.dec_in(z))
        h = nn.functional.silu(self.dec_film(self.dec_mid(h), snr_db)) + h
        return self.dec_out(h) * self.std + self.mean

    def state_for_save(self) -> dict[str, torch.Tensor]:
        """Weights as float16 (half the size in the committed set; the standardisation stays float32)."""
        return {k: v.detach().cpu().to(torch.float32 if k in ("mean", "std") else torch.float16).contiguous()
                for k, v in self.state_dict().items()}

    @classmethod
    def from_file(cls, path: Path, state: dict[str, torch.Tensor]) -> "HiddenJsccNet":
        """Rebuild from a safetensors file's metadata (architecture) and its tensors; eval mode."""
        try:
            with safe_open(str(path), framework="pt") as fh:
                config = json.loads((fh.metadata() or {})["config"])
            net = cls(**config)
            net.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError, OSError, TypeError) as exc:
            raise CodecError(f"jscc-hidden weights {path} do not load: {exc}") from exc
        return net.eval()


@register_terminal("jscc-row")
class HiddenJsccMapper(AnalogMapper):
    """Learned analog JSCC of hidden-state rows (module docstring)."""

    request_params = (SNR_PARAM,)

    def __init__(self, params: dict[str, str], weights_dir: Path | None = None) -> None:
        del params
        self.set = load_codec_set(weights_dir, JSCC_FILE)
        self.net = HiddenJsccNet.from_file(self.set.folder / JSCC_FILE, self.set.arrays[JSCC_FILE])
        lo, hi = self.net.config.get("snr_range_db", SNR_RANGE_DB)
        self.snr_range = (float(lo), float(hi))

    def _snr(self, params: dict[str, str], rows: int) -> torch.Tensor:
        snr = min(max(read_snr_db(params), self.snr_range[0]), self.snr_range[1])
        return torch.full((rows,), snr)

    @torch.no_grad()
    def to_symbols(self, tensors: dict[str, torch.Tensor], ctx: StageContext) -> np.ndarray:
        stamp_and_check_set(self.set, ctx, encoding=True)
        ctx.params[SNR_PARAM] = f"{read_snr_db(ctx.params):g}"
        out = []
        for name, t in tensors.items():
            rows = torch.nan_to_num(as_rows(t.float()))
            if rows.shape[1] != self.net.dim:
                raise CodecError(f"jscc-hidden was trained on rows of {self.net.dim} values; "
                                 f"{name!r} has {rows.shape[1]}")
            out.append(self.net.encode(rows, self._snr(ctx.params, rows.shape[0])).reshape(-1))
        return torch.cat(out).numpy().astype(np.complex64)

    @torch.no_grad()
    def from_symbols(self, symbols: np.ndarray, infos: list[TensorInfo], ctx: StageContext
                     ) -> dict[str, torch.Tensor]:
        stamp_and_check_set(self.set, ctx, encoding=False)
        plans, expected = [], 0
        for info in infos:
            rows, d = info_rows(info)
            if d != self.net.dim:
                raise CodecError(f"jscc-hidden cannot decode tensor {info.name!r} of shape {info.shape}")
            plans.append((info, rows))
            expected += rows * self.net.symbols
        symbols = np.asarray(symbols)
        if symbols.ndim != 1 or symbols.size != expected:
            raise CodecError(f"jscc-hidden payload has {symbols.size} symbols, expected {expected}")
        rx = torch.from_numpy(np.nan_to_num(symbols.astype(np.complex64)))
        out, pos = {}, 0
        for info, rows in plans:
            chunk = rx[pos:pos + rows * self.net.symbols].reshape(rows, self.net.symbols)
            pos += rows * self.net.symbols
            out[info.name] = self.net.decode(chunk, self._snr(ctx.params, rows)).reshape(info.shape)
        return out


register_preset("jscc-hidden", "jscc-row",
                "Learned SNR-adaptive analog JSCC per hidden row, d values -> 32 complex symbols (analog)",
                sources=(LLM_SOURCE,))

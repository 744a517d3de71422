"""The testbed's analog latent channel on batches of latents, for training and evaluating the robust decoder.

The physics is the emulator's own (:mod:`radio`: AWGN, or Rayleigh block fading over 64-symbol blocks with
receiver CSI and MMSE equalisation, N0 = P / 10^(snr_db/10) per image). This module only maps latents to
symbols as the ``analog`` codec does: each image's latent is flattened and consecutive value pairs form
complex symbols ``x = v[2k] + j v[2k+1]`` (a zero is appended if the count is odd).
"""

from __future__ import annotations

from typing import Literal

import torch

from radio import build_block

ChannelKind = Literal["awgn", "rayleigh"]


def _to_symbols(latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, ...) real -> (B, S) complex symbols; returns also the real value count."""
    flat = latents.reshape(latents.shape[0], -1).float()
    n = flat.shape[1]
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
    return torch.complex(flat[:, 0::2], flat[:, 1::2]), n


def _from_symbols(sym: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    flat = torch.stack([sym.real, sym.imag], dim=-1).reshape(sym.shape[0], -1)[:, :n]
    return flat.reshape(like.shape).to(like.dtype)


def apply_channel(latents: torch.Tensor, snr_db: float | torch.Tensor, kind: ChannelKind = "awgn",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Send a batch of latents through the channel and return what the receiver decodes.

    ``snr_db`` is a float or a per-image tensor of shape (B,). The output has the input's shape and dtype.
    """
    if kind not in ("awgn", "rayleigh"):
        raise ValueError(f"unknown channel kind {kind!r}")
    x, n = _to_symbols(latents)
    block = build_block(kind, {"snr_db": 0.0})  # the SNR is given per image below
    return _from_symbols(block.apply_analog(x, generator, snr_db), n, latents)


def measured_snr_db(sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Per-image ``10 log10(P_signal / P_error)`` (useful to verify the AWGN channel)."""
    x, _ = _to_symbols(sent)
    y, _ = _to_symbols(received)
    p = x.abs().pow(2).mean(dim=1)
    e = (y - x).abs().pow(2).mean(dim=1)
    return 10 * torch.log10(p / e)

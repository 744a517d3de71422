"""Rayleigh block fading: h ~ CN(0, 1) per coherence block (time-correlated with a Doppler shift), equalised
with receiver CSI."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelParams, block_fading
from radio.channels import CHANNELS
from radio.channels.awgn import snr_param
from radio.params import param

DEFAULT_COHERENCE_SYMBOLS = 64


def coherence_param() -> int:
    return param(DEFAULT_COHERENCE_SYMBOLS, kind=int, lo=1, hi=1 << 24, unit="symbols",
                 help="block-fading length: symbols that share one channel gain")


def doppler_param() -> float:
    return param(0.0, lo=0.0, hi=1e5, unit="Hz",
                 help="maximum Doppler shift: consecutive fading blocks are correlated by J0(2π·f_d·T_block); "
                      "0 draws independent blocks")


def block_correlation(doppler_hz: float, coherence_symbols: int, symbol_rate_hz: float) -> float:
    """Clarke/Jakes correlation J0(2π f_d T) of gains one block apart (T = the block's duration)."""
    from scipy.special import j0

    if doppler_hz <= 0.0:
        return 0.0
    rho = float(j0(2.0 * math.pi * doppler_hz * coherence_symbols / symbol_rate_hz))
    return min(max(rho, 0.0), 0.9999)  # a negative lag correlation is as good as none for a first-order model


@dataclass(frozen=True)
class RayleighParams(ChannelParams):
    snr_db: float = snr_param()
    coherence_symbols: int = coherence_param()
    doppler_hz: float = doppler_param()


@CHANNELS.register("rayleigh")
class RayleighChannel(ChannelBlock):
    description = "Rayleigh block fading (h ~ CN(0,1) per coherence block), equalised with receiver CSI"
    Params = RayleighParams
    fading = True

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        p = self.params
        rho = block_correlation(p.doppler_hz, p.coherence_symbols, self.symbol_rate_hz)
        return block_fading(rows, n, p.coherence_symbols, generator, device, correlation=rho)

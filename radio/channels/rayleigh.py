"""Rayleigh block fading: h ~ CN(0, 1) per coherence block, equalised with receiver CSI."""

from __future__ import annotations

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


@dataclass(frozen=True)
class RayleighParams(ChannelParams):
    snr_db: float = snr_param()
    coherence_symbols: int = coherence_param()


@CHANNELS.register("rayleigh")
class RayleighChannel(ChannelBlock):
    description = "Rayleigh block fading (h ~ CN(0,1) per coherence block), equalised with receiver CSI"
    Params = RayleighParams
    fading = True

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        return block_fading(rows, n, self.params.coherence_symbols, generator, device)

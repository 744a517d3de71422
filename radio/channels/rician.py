"""Rician block fading: a line-of-sight component of random phase plus Rayleigh scatter, K = LOS/scatter power."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelParams, block_fading
from radio.channels import CHANNELS
from radio.channels.awgn import snr_param
from radio.channels.rayleigh import coherence_param
from radio.params import param


@dataclass(frozen=True)
class RicianParams(ChannelParams):
    snr_db: float = snr_param()
    k_factor: float = param(4.0, lo=0.0, hi=1e4, help="Rician K factor (linear): line-of-sight over scatter power")
    coherence_symbols: int = coherence_param()


@CHANNELS.register("rician")
class RicianChannel(ChannelBlock):
    description = "Rician block fading with K factor (line of sight + scatter), equalised with receiver CSI"
    Params = RicianParams
    fading = True

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        k = self.params.k_factor
        gen_device = generator.device if generator is not None else device
        phase = torch.rand(rows, generator=generator, device=gen_device) * (2 * math.pi)
        los = math.sqrt(k / (k + 1.0)) * torch.polar(torch.ones_like(phase), phase)
        return block_fading(rows, n, self.params.coherence_symbols, generator, device, los=los,
                            scatter_gain=math.sqrt(1.0 / (k + 1.0)))

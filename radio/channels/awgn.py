"""Additive white Gaussian noise at a receive SNR relative to the measured power of what is sent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelParams
from radio.channels import CHANNELS
from radio.params import param

#: The receive SNRs every noisy channel accepts.
SNR_RANGE_DB = (-30.0, 60.0)


def snr_param() -> float:
    return param(lo=SNR_RANGE_DB[0], hi=SNR_RANGE_DB[1], unit="dB",
                 help="receive SNR in dB, relative to the measured power of what is sent (required)")


@dataclass(frozen=True)
class AwgnParams(ChannelParams):
    snr_db: float = snr_param()


@CHANNELS.register("awgn")
class AwgnChannel(ChannelBlock):
    description = "Additive white Gaussian noise at snr_db"
    Params = AwgnParams

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        return torch.ones(rows, n, dtype=torch.complex64, device=device)

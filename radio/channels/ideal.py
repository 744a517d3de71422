"""The ideal channel: no noise and no fading; airtime and delay still apply."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelParams
from radio.channels import CHANNELS


@dataclass(frozen=True)
class IdealParams(ChannelParams):
    """No parameters: the link's bandwidth and delay are the only costs."""


@CHANNELS.register("ideal")
class IdealChannel(ChannelBlock):
    description = "No noise, no fading; airtime and delay still apply"
    Params = IdealParams
    noiseless = True

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        return torch.ones(rows, n, dtype=torch.complex64, device=device)

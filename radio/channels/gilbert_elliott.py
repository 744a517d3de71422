"""Gilbert–Elliott bursts: a two-state Markov chain over coherence blocks; in the bad state the link loses
``bad_loss_db`` (a shadow, a blocked line of sight), so errors and LDPC erasures arrive in bursts rather than
independently."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelParams
from radio.channels import CHANNELS
from radio.channels.awgn import snr_param
from radio.channels.rayleigh import coherence_param
from radio.params import param


@dataclass(frozen=True)
class GilbertElliottParams(ChannelParams):
    snr_db: float = snr_param()
    bad_loss_db: float = param(30.0, lo=0.0, hi=100.0, unit="dB", help="extra loss in the bad (burst) state")
    p_enter_bad: float = param(0.05, lo=0.0, hi=1.0, help="probability per block of entering the bad state")
    p_leave_bad: float = param(0.3, lo=0.0, hi=1.0, help="probability per block of leaving the bad state")
    coherence_symbols: int = coherence_param()


@CHANNELS.register("gilbert-elliott")
class GilbertElliottChannel(ChannelBlock):
    description = "Bursty link: AWGN whose blocks fall into a bad state (bad_loss_db deeper) by a two-state Markov chain"
    Params = GilbertElliottParams
    fading = True

    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        p = self.params
        blocks = max(1, -(-n // p.coherence_symbols))
        gen_device = generator.device if generator is not None else device
        u = torch.rand(rows, blocks + 1, generator=generator, device=gen_device)
        enter, leave = p.p_enter_bad, p.p_leave_bad
        stationary_bad = enter / (enter + leave) if enter + leave > 0 else 0.0
        bad = u[:, 0] < stationary_bad                     # start from the chain's stationary distribution
        states = []
        for k in range(blocks):
            states.append(bad)
            bad = torch.where(bad, u[:, k + 1] >= leave, u[:, k + 1] < enter)
        state = torch.stack(states, dim=1).to(device)
        amplitude = torch.where(state, torch.tensor(10.0 ** (-p.bad_loss_db / 20.0), device=device),
                                torch.tensor(1.0, device=device))
        return amplitude.to(torch.complex64).repeat_interleave(p.coherence_symbols, dim=1)[:, :n]

"""Channel state information as a receiver really gets it: from pilots that cost channel uses.

Per coherence block the transmitter sends ``pilots`` known unit-power symbols through the same gain as the
data; the receiver's least-squares estimate is ĥ = mean(y_p / x_p), with error variance N0 / pilots, and the
noise power is estimated from the pilots' residuals. With ``csi: "estimated"`` the receiver equalises the
data with ĥ instead of the true h; either way the SNR estimate (mean (|ĥ|² − N̂0/pilots)·P / N̂0 over the
blocks: the pilots' own noise taken out) is what the receiver can feed back to the transmitter, after the
link's feedback delay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from radio.block import ChannelBlock, ChannelOutput, complex_normal


#: The lowest SNR an estimate reports (linear; -30 dB).
SNR_FLOOR = 1e-3


@dataclass
class CsiEstimate:
    """What the receiver measured: per-symbol gain estimates (B, S), N0 estimates (B, 1), the mean SNR."""

    gains: torch.Tensor
    noise_var: torch.Tensor
    snr_db: float
    pilot_symbols: int


def coherence_of(block: ChannelBlock, n: int) -> int:
    """Symbols over which the block's gain is constant (the whole row for AWGN and ideal)."""
    return int(getattr(block.params, "coherence_symbols", n) or n) or 1


def estimate(block: ChannelBlock, out: ChannelOutput, pilots: int, generator: torch.Generator | None
             ) -> CsiEstimate:
    """Pilot-based estimates for a transmission whose true gains and noise are in ``out``.

    The pilots see the data's gain per coherence block and fresh noise of the same N0 (N0 is fixed by the
    data's measured power, the SNR convention of every block)."""
    b, s = out.gains.shape
    coherence = min(coherence_of(block, s), max(s, 1))
    blocks = max(1, math.ceil(s / coherence))
    h_block = out.gains[:, ::coherence][:, :blocks]                       # (B, blocks), one gain per block
    noise = complex_normal((b, blocks, pilots), generator, out.gains.device) * out.noise_var.sqrt()[:, :, None]
    y_p = h_block[:, :, None] + noise                                     # pilots x_p = 1
    h_hat = y_p.mean(dim=2)
    resid = (y_p - h_hat[:, :, None]).abs().pow(2).sum(dim=2) / max(pilots - 1, 1)
    n0_hat = resid.mean(dim=1, keepdim=True).clamp_min(1e-12)
    # |ĥ|² overestimates |h|² by the estimate's own noise, N0/pilots (+3 dB at -10 dB with 8 pilots): subtract
    # it, and floor the result at -30 dB (below that the pilots cannot tell the SNR from zero).
    gain2 = (h_hat.abs().pow(2) - n0_hat / pilots).mean(dim=1, keepdim=True)
    snr = (gain2 * out.signal_power / n0_hat).mean().clamp_min(SNR_FLOOR)
    gains = h_hat.repeat_interleave(coherence, dim=1)[:, :s]
    return CsiEstimate(gains, n0_hat, 10.0 * math.log10(max(float(snr), 1e-12)), pilots * blocks)


def with_estimated_csi(out: ChannelOutput, csi: CsiEstimate) -> ChannelOutput:
    """The receiver's view: the same received symbols, equalised with the estimates instead of the truth."""
    return ChannelOutput(out.received, csi.gains, csi.noise_var, out.signal_power)

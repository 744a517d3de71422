"""The channel block: y = h·x + n, written once in torch and used by the emulator, training and benchmarks.

Conventions (those of the MEG paper's code): the SNR is relative to the *measured* average power of what each
row sends, N0 = mean(|x|²) / SNR (per row: one row is one request or one training image). Fading is block
fading: one complex gain ``h`` per coherence block, drawn in the order rows × blocks, known to the receiver
(CSI at the receiver). Randomness comes from an explicit :class:`torch.Generator` (gains first, then the
noise's real and imaginary parts), so a seed reproduces a run on any path. Every operation is differentiable
in ``x``, so JSCC training backpropagates through the very channel the emulator applies.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from radio.params import ChannelError, validate_fields

__all__ = ["ChannelBlock", "ChannelError", "ChannelOutput", "ChannelParams", "complex_normal"]


@dataclass(frozen=True)
class ChannelParams:
    """Base of a channel model's parameters (declared with :func:`radio.params.param`)."""

    def validate(self) -> "ChannelParams":
        validate_fields(self)
        return self


@dataclass
class ChannelOutput:
    """Received symbols (B, S), the gains the receiver knows (B, S), N0 (B, 1) and the sent power (B, 1)."""

    received: torch.Tensor
    gains: torch.Tensor
    noise_var: torch.Tensor
    signal_power: torch.Tensor


def complex_normal(shape: tuple[int, ...], generator: torch.Generator | None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """CN(0, 1) samples: real parts, then imaginary parts, drawn on the generator's device."""
    gen_device = generator.device if generator is not None else torch.device(device)
    re = torch.randn(shape, generator=generator, device=gen_device)
    im = torch.randn(shape, generator=generator, device=gen_device)
    return (torch.complex(re, im) / math.sqrt(2.0)).to(device)


class ChannelBlock(abc.ABC):
    """One channel model. Subclasses set ``Params``, ``description`` and :meth:`draw_gains`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Params: ClassVar[type[ChannelParams]] = ChannelParams
    #: True for a channel that adds no noise (the link still costs airtime and delay)
    noiseless: ClassVar[bool] = False
    #: True for a fading channel: the analog receiver equalises with its CSI (AWGN needs no equaliser)
    fading: ClassVar[bool] = False

    def __init__(self, params: ChannelParams | None = None, symbol_rate_hz: float = 1.0e6) -> None:
        params = params if params is not None else self.Params()
        #: complex channel uses per second (time-varying models turn symbol counts into time with it)
        self.symbol_rate_hz = symbol_rate_hz
        if not isinstance(params, self.Params):
            raise ChannelError(f"channel.model: {self.name} takes {self.Params.__name__}, "
                               f"got {type(params).__name__}")
        self.params = params.validate()

    @property
    def snr_db(self) -> float | None:
        return getattr(self.params, "snr_db", None)

    @abc.abstractmethod
    def draw_gains(self, rows: int, n: int, generator: torch.Generator | None, device: torch.device
                   ) -> torch.Tensor:
        """Complex gain of each of ``n`` symbols of each row, (rows, n)."""

    def transmit(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 snr_db: torch.Tensor | float | None = None) -> ChannelOutput:
        """y = h·x + n for complex symbols ``x`` (B, S); ``snr_db`` (scalar or (B,)) overrides the params'."""
        x = _as_rows(x)
        b, s = x.shape
        power = x.abs().pow(2).mean(dim=1, keepdim=True) if s else torch.zeros(b, 1, device=x.device)
        h = self.draw_gains(b, s, generator, x.device)
        if self.noiseless or s == 0:
            return ChannelOutput(h * x, h, torch.zeros_like(power), power)
        snr = self._snr(snr_db, b, x.device)
        n0 = torch.where(power > 0, power, torch.ones_like(power)) / torch.pow(10.0, snr[:, None] / 10.0)
        noise = complex_normal((b, s), generator, x.device) * n0.sqrt()
        return ChannelOutput(h * x + noise, h, n0, power)

    def _snr(self, snr_db: torch.Tensor | float | None, rows: int, device: torch.device) -> torch.Tensor:
        value = self.snr_db if snr_db is None else snr_db
        if value is None:
            raise ChannelError(f"channel.snr_db: required for {self.name}")
        snr = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1)
        if snr.numel() == 1:
            return snr.expand(rows)
        if snr.numel() != rows:
            raise ValueError("snr_db must be a scalar or have one value per row")
        return snr

    @staticmethod
    def equalize_mmse(out: ChannelOutput) -> torch.Tensor:
        """Scalar MMSE equaliser conj(h)·y / (|h|² + N0/P): what an analog receiver estimates."""
        ratio = out.noise_var / out.signal_power.clamp_min(1e-12)
        return out.gains.conj() * out.received / (out.gains.abs().pow(2) + ratio)

    @staticmethod
    def equalize_zf(out: ChannelOutput, min_gain2: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-forcing y/h and the per-symbol noise variance N0/|h|² after it (for hard or soft decisions)."""
        gain2 = out.gains.abs().pow(2)
        safe = torch.where(gain2 < min_gain2, torch.ones_like(out.gains), out.gains)
        return out.received / safe, out.noise_var / gain2.clamp_min(min_gain2)

    def apply_analog(self, x: torch.Tensor, generator: torch.Generator | None = None,
                     snr_db: torch.Tensor | float | None = None) -> torch.Tensor:
        """What an analog receiver sees after MMSE equalisation, same shape as ``x``."""
        shape = x.shape
        out = self.transmit(_as_rows(x), generator, snr_db)
        received = self.equalize_mmse(out) if self.fading and not self.noiseless else out.received
        return received.reshape(shape)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What GET /v1/channels lists for this model."""
        from radio.params import field_specs

        return {"name": cls.name, "description": cls.description, "noiseless": cls.noiseless,
                "parameters": [s.name for s in field_specs(cls.Params)]}


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    if not torch.is_complex(x):
        raise TypeError(f"channel input must be complex symbols, got {x.dtype}")
    return x.reshape(1, -1) if x.dim() == 1 else x.reshape(x.shape[0], -1)


def block_fading(rows: int, n: int, coherence: int, generator: torch.Generator | None, device: torch.device,
                 los: torch.Tensor | None = None, scatter_gain: float = 1.0, correlation: float = 0.0) -> torch.Tensor:
    """Gains constant over blocks of ``coherence`` symbols: ``los + scatter_gain · g_k`` per block, where the
    scatter g_k ~ CN(0, 1) follows a first-order Gauss–Markov process with ``correlation`` between consecutive
    blocks (0: independent blocks)."""
    blocks = max(1, math.ceil(n / coherence))
    w = complex_normal((rows, blocks), generator, device)
    if correlation > 0.0:
        innovation = math.sqrt(1.0 - correlation ** 2)
        g = [w[:, 0]]
        for k in range(1, blocks):
            g.append(correlation * g[-1] + innovation * w[:, k])
        w = torch.stack(g, dim=1)
    h = w * scatter_gain
    if los is not None:
        h = h + los.to(device).reshape(-1, 1)
    return h.repeat_interleave(coherence, dim=1)[:, :n]

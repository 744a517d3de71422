"""Wireless channel models: the math the emulator service and the benchmarks share.

Conventions (those of the MEG paper's code): the SNR is relative to the *measured* average power of what is
sent, N0 = mean(|x|²) / SNR. Fading is block fading: one complex gain ``h`` per coherence block, known to the
receiver (CSI at the receiver), which equalises with the scalar MMSE filter conj(h)·y / (|h|² + N0/P).
AWGN is the special case h = 1 with no equaliser.

Every function takes an explicit :class:`numpy.random.Generator`, so experiments are reproducible.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

#: Defaults the emulator uses when a request leaves a field unset.
DEFAULT_SNR_DB = 10.0
DEFAULT_BANDWIDTH_HZ = 1.0e6
DEFAULT_DELAY_MS = 0.0
DEFAULT_K_FACTOR = 4.0
DEFAULT_COHERENCE_SYMBOLS = 64
SNR_RANGE_DB = (-20.0, 40.0)


class ChannelError(ValueError):
    """An invalid channel specification; the message names the field."""


@dataclass(frozen=True)
class ChannelConfig:
    """One link as requested: model name and its parameters (validated by :func:`validate`)."""

    model: str = "ideal"
    snr_db: float = DEFAULT_SNR_DB
    bandwidth_hz: float = DEFAULT_BANDWIDTH_HZ
    delay_ms: float = DEFAULT_DELAY_MS
    k_factor: float = DEFAULT_K_FACTOR
    coherence_symbols: int = DEFAULT_COHERENCE_SYMBOLS
    modulation: str = "qpsk"
    seed: int | None = None

    def validate(self) -> "ChannelConfig":
        if self.model not in _CHANNELS:
            raise ChannelError(f"channel.model: unknown channel model {self.model!r}; known: {', '.join(channel_names())}")
        if not SNR_RANGE_DB[0] <= self.snr_db <= SNR_RANGE_DB[1]:
            raise ChannelError(f"channel.snr_db: {self.snr_db} dB is outside [{SNR_RANGE_DB[0]}, {SNR_RANGE_DB[1]}]")
        if not (1e3 <= self.bandwidth_hz <= 1e10):
            raise ChannelError(f"channel.bandwidth_hz: {self.bandwidth_hz} is outside [1e3, 1e10] Hz")
        if not (0.0 <= self.delay_ms <= 10_000.0):
            raise ChannelError(f"channel.delay_ms: {self.delay_ms} is outside [0, 10000] ms")
        if not (0.0 <= self.k_factor <= 1e4):
            raise ChannelError(f"channel.k_factor: {self.k_factor} is outside [0, 10000]")
        if not (1 <= self.coherence_symbols <= 1 << 24):
            raise ChannelError(f"channel.coherence_symbols: {self.coherence_symbols} is outside [1, 2^24]")
        if self.modulation not in MODULATIONS:
            raise ChannelError(f"channel.modulation: unknown modulation {self.modulation!r}; "
                               f"known: {', '.join(MODULATIONS)}")
        return self

    @property
    def noisy(self) -> bool:
        return self.model != "ideal"


@dataclass
class ChannelOutput:
    """Received symbols, the per-symbol gains the receiver knows, and the noise variance N0."""

    received: np.ndarray
    gains: np.ndarray
    noise_var: float
    signal_power: float


class WirelessChannel(abc.ABC):
    """A channel model: draws per-symbol gains; the shared :meth:`transmit` adds noise and equalises."""

    name: str = ""
    description: str = ""
    parameters: tuple[str, ...] = ()

    def __init__(self, config: ChannelConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def gains(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Complex gain of each of ``n`` symbols (block-constant for fading models)."""

    def transmit(self, symbols: np.ndarray, rng: np.random.Generator) -> ChannelOutput:
        """y = h·x + n with N0 = mean(|x|²)/SNR."""
        x = np.asarray(symbols, dtype=np.complex128)
        power = float(np.mean(np.abs(x) ** 2)) if x.size else 0.0
        h = self.gains(x.size, rng)
        if not self.config.noisy or x.size == 0:
            return ChannelOutput(x.copy(), h, 0.0, power)
        n0 = (power if power > 0 else 1.0) / (10.0 ** (self.config.snr_db / 10.0))
        noise = np.sqrt(n0 / 2.0) * (rng.standard_normal(x.size) + 1j * rng.standard_normal(x.size))
        return ChannelOutput(h * x + noise, h, n0, power)

    def equalize(self, out: ChannelOutput) -> np.ndarray:
        """Scalar MMSE equaliser with CSI at the receiver; identity for AWGN/ideal."""
        if np.all(out.gains == 1.0) or out.noise_var == 0.0:
            return out.received / out.gains
        p = out.signal_power if out.signal_power > 0 else 1.0
        return np.conj(out.gains) * out.received / (np.abs(out.gains) ** 2 + out.noise_var / p)

    def apply_analog(self, symbols: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What an analog receiver sees after equalisation."""
        return self.equalize(self.transmit(symbols, rng)).astype(np.complex64)


_CHANNELS: dict[str, type[WirelessChannel]] = {}
C = TypeVar("C", bound=type[WirelessChannel])


def register_channel(name: str) -> Callable[[C], C]:
    def wrap(cls: C) -> C:
        if name in _CHANNELS:
            raise ValueError(f"channel {name!r} registered twice")
        cls.name = name
        _CHANNELS[name] = cls
        return cls
    return wrap


def channel_names() -> list[str]:
    return list(_CHANNELS)


def list_channels() -> list[type[WirelessChannel]]:
    return list(_CHANNELS.values())


def build_channel(config: ChannelConfig) -> WirelessChannel:
    return _CHANNELS[config.validate().model](config)


@register_channel("ideal")
class IdealChannel(WirelessChannel):
    description = "No noise, no fading; airtime and delay still apply"
    parameters = ("bandwidth_hz", "delay_ms")

    def gains(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.ones(n, dtype=np.complex128)


@register_channel("awgn")
class AwgnChannel(WirelessChannel):
    description = "Additive white Gaussian noise at snr_db"
    parameters = ("snr_db", "bandwidth_hz", "delay_ms", "modulation")

    def gains(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.ones(n, dtype=np.complex128)


def _block_expand(block_gains: np.ndarray, n: int, block: int) -> np.ndarray:
    return np.repeat(block_gains, block)[:n]


@register_channel("rayleigh")
class RayleighChannel(WirelessChannel):
    description = "Rayleigh block fading (h ~ CN(0,1) per coherence block), MMSE-equalised with receiver CSI"
    parameters = ("snr_db", "coherence_symbols", "bandwidth_hz", "delay_ms", "modulation")

    def gains(self, n: int, rng: np.random.Generator) -> np.ndarray:
        blocks = max(1, math.ceil(n / self.config.coherence_symbols))
        h = (rng.standard_normal(blocks) + 1j * rng.standard_normal(blocks)) / np.sqrt(2.0)
        return _block_expand(h, n, self.config.coherence_symbols)


@register_channel("rician")
class RicianChannel(WirelessChannel):
    description = "Rician block fading with K factor (line of sight + scatter), MMSE-equalised"
    parameters = ("snr_db", "k_factor", "coherence_symbols", "bandwidth_hz", "delay_ms", "modulation")

    def gains(self, n: int, rng: np.random.Generator) -> np.ndarray:
        k = self.config.k_factor
        blocks = max(1, math.ceil(n / self.config.coherence_symbols))
        los = np.sqrt(k / (k + 1.0)) * np.exp(1j * rng.uniform(0, 2 * np.pi))
        scatter = np.sqrt(1.0 / (k + 1.0)) * (rng.standard_normal(blocks) + 1j * rng.standard_normal(blocks)) / np.sqrt(2.0)
        return _block_expand(los + scatter, n, self.config.coherence_symbols)


# --- uncoded digital transmission: Gray-mapped square QAM with hard decisions -----------------------------

#: bits per symbol of each modulation
MODULATIONS: dict[str, int] = {"bpsk": 1, "qpsk": 2, "16qam": 4, "64qam": 6}


def _pam_levels(bits: int) -> np.ndarray:
    m = 1 << bits
    return np.arange(-(m - 1), m, 2, dtype=np.float64)


def _gray_to_index(bits: np.ndarray) -> np.ndarray:
    """Gray-coded bit groups (rows, MSB first) to PAM level index."""
    b = bits.astype(np.int64)
    idx = b[:, 0].copy()
    acc = b[:, 0].copy()
    for j in range(1, b.shape[1]):
        acc = acc ^ b[:, j]
        idx = (idx << 1) | acc
    return idx


def _index_to_gray(idx: np.ndarray, nbits: int) -> np.ndarray:
    gray = idx ^ (idx >> 1)
    return ((gray[:, None] >> np.arange(nbits - 1, -1, -1)) & 1).astype(np.uint8)


def qam_modulate(bits: np.ndarray, modulation: str) -> np.ndarray:
    """Map a bit array (0/1, padded with zeros to whole symbols) to unit-power Gray QAM symbols."""
    k = MODULATIONS[modulation]
    bits = np.asarray(bits, dtype=np.uint8)
    pad = (-bits.size) % k
    bits = np.concatenate([bits, np.zeros(pad, np.uint8)]).reshape(-1, k)
    if modulation == "bpsk":
        return (2.0 * bits[:, 0] - 1.0).astype(np.complex128)
    half = k // 2
    levels = _pam_levels(half)
    i = levels[_gray_to_index(bits[:, :half])]
    q = levels[_gray_to_index(bits[:, half:])]
    norm = np.sqrt(2.0 * np.mean(levels ** 2))
    return (i + 1j * q) / norm


def qam_demodulate_hard(symbols: np.ndarray, modulation: str, nbits: int) -> np.ndarray:
    """Nearest-point decisions back to ``nbits`` bits."""
    k = MODULATIONS[modulation]
    if modulation == "bpsk":
        return (symbols.real > 0).astype(np.uint8)[:nbits]
    half = k // 2
    levels = _pam_levels(half)
    norm = np.sqrt(2.0 * np.mean(levels ** 2))

    def decide(v: np.ndarray) -> np.ndarray:
        idx = np.clip(np.round((v * norm + (len(levels) - 1)) / 2.0), 0, len(levels) - 1).astype(np.int64)
        return _index_to_gray(idx, half)

    bits = np.concatenate([decide(symbols.real), decide(symbols.imag)], axis=1).reshape(-1)
    return bits[:nbits]


@dataclass
class DigitalResult:
    data: bytes
    symbols: int
    bit_errors: int


def transmit_bytes_uncoded(channel: WirelessChannel, data: bytes, rng: np.random.Generator) -> DigitalResult:
    """Send bytes as Gray QAM symbols through ``channel`` with hard decisions: bit errors follow the
    modulation's BER at the instantaneous SNR of each fading block. No FEC (see the digital chain)."""
    modulation = channel.config.modulation
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    symbols = qam_modulate(bits, modulation)
    if not channel.config.noisy:
        return DigitalResult(bytes(data), symbols.size, 0)
    out = channel.transmit(symbols, rng)
    # Zero-forcing is the right detector for hard QAM decisions (MMSE's bias would shrink the constellation).
    rx_bits = qam_demodulate_hard(out.received / out.gains, modulation, bits.size)
    errors = int(np.count_nonzero(rx_bits != bits))
    return DigitalResult(np.packbits(rx_bits).tobytes(), symbols.size, errors)


def qam_ber_awgn(snr_db: float, modulation: str) -> float:
    """Theoretical Gray-coded BER on AWGN at symbol SNR Es/N0 (exact for BPSK/QPSK, nearest-neighbour for QAM)."""
    from scipy.special import erfc

    snr = 10.0 ** (snr_db / 10.0)
    k = MODULATIONS[modulation]

    def q(x: float) -> float:
        return 0.5 * float(erfc(x / np.sqrt(2.0)))

    if modulation == "bpsk":
        return q(np.sqrt(2.0 * snr))
    if modulation == "qpsk":
        return q(np.sqrt(snr))
    m = 1 << k
    return 4.0 / k * (1.0 - 1.0 / np.sqrt(m)) * q(np.sqrt(3.0 * snr / (m - 1)))

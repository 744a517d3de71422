"""Gray-mapped square QAM with hard decisions, and its bit error rate on AWGN.

Uncoded digital transmission (``fec: "none"``): what raw QAM does to bytes. The coded chain in
:mod:`radio.digital` uses Sionna's constellations with the same unit average power, so SNRs compare.
"""

from __future__ import annotations

import math

import numpy as np
import torch

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


def qam_modulate(bits: np.ndarray, modulation: str) -> torch.Tensor:
    """Bits (0/1, zero-padded to whole symbols) to unit-power Gray QAM symbols (complex64)."""
    k = MODULATIONS[modulation]
    bits = np.asarray(bits, dtype=np.uint8)
    bits = np.concatenate([bits, np.zeros((-bits.size) % k, np.uint8)]).reshape(-1, k)
    if modulation == "bpsk":
        return torch.from_numpy((2.0 * bits[:, 0] - 1.0).astype(np.complex64))
    half = k // 2
    levels = _pam_levels(half)
    i = levels[_gray_to_index(bits[:, :half])]
    q = levels[_gray_to_index(bits[:, half:])]
    norm = np.sqrt(2.0 * np.mean(levels ** 2))
    return torch.from_numpy(((i + 1j * q) / norm).astype(np.complex64))


def qam_demodulate_hard(symbols: torch.Tensor, modulation: str, nbits: int) -> np.ndarray:
    """Nearest-point decisions back to ``nbits`` bits."""
    sym = symbols.detach().reshape(-1).numpy()
    k = MODULATIONS[modulation]
    if modulation == "bpsk":
        return (sym.real > 0).astype(np.uint8)[:nbits]
    half = k // 2
    levels = _pam_levels(half)
    norm = np.sqrt(2.0 * np.mean(levels ** 2))

    def decide(v: np.ndarray) -> np.ndarray:
        idx = np.clip(np.round((v * norm + (len(levels) - 1)) / 2.0), 0, len(levels) - 1).astype(np.int64)
        return _index_to_gray(idx, half)

    bits = np.concatenate([decide(sym.real), decide(sym.imag)], axis=1).reshape(-1)
    return bits[:nbits]


def _q(x: float) -> float:
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def pam_gray_ber(m: int, snr_per_dim: float) -> float:
    """Exact bit error rate of Gray-coded M-PAM with levels ±1, ±3, … and noise std σ, given d/σ.

    Exact (Cho & Yoon's closed form, as a direct sum): for each bit position, the probability that the
    decision lands in a region whose Gray label differs in that bit, averaged over the transmitted levels.
    ``snr_per_dim`` is 1/σ for levels spaced 2 apart.
    """
    bits = int(math.log2(m))
    inv_sigma = snr_per_dim
    total = 0.0
    labels = [i ^ (i >> 1) for i in range(m)]
    for tx in range(m):
        for rx in range(m):
            if rx == tx:
                continue
            # decision region of level rx: (2rx - m, 2rx - m + 2) around level 2rx - m + 1, relative to tx
            lo = -math.inf if rx == 0 else (2 * rx - m) - (2 * tx - m + 1)
            hi = math.inf if rx == m - 1 else (2 * rx - m + 2) - (2 * tx - m + 1)
            p = (_q(lo * inv_sigma) if lo != -math.inf else 1.0) - (_q(hi * inv_sigma) if hi != math.inf else 0.0)
            total += p * bin(labels[tx] ^ labels[rx]).count("1")
    return total / (m * bits)


def qam_ber_awgn(snr_db: float, modulation: str) -> float:
    """Exact Gray-coded BER on AWGN at symbol SNR Es/N0 (square QAM = two independent Gray PAMs)."""
    snr = 10.0 ** (snr_db / 10.0)
    k = MODULATIONS[modulation]
    if modulation == "bpsk":
        return _q(math.sqrt(2.0 * snr))
    m = 1 << (k // 2)
    # Per dimension: levels ±1, ±3, … have mean power (m²-1)/3; Es = 2·that; noise var per dim N0/2.
    es_unit = 2.0 * (m * m - 1) / 3.0
    sigma = math.sqrt(es_unit / snr / 2.0)
    return pam_gray_ber(m, 1.0 / sigma)

"""What one payload goes through on the air, and what it costs: the link the emulator applies per request and
the benchmarks apply per image (so a change here changes both the service and the curves).

* analog payloads: complex symbols through the channel block, MMSE-equalised;
* digital payloads, ``fec: "none"``: Gray QAM with hard decisions (zero-forcing);
* digital payloads, ``fec: "ldpc"``: the CRC + 5G LDPC + QAM chain of :mod:`radio.digital`; blocks that fail
  their CRC arrive zeroed and are reported as erased byte ranges, as a PHY reports CRC status.

A :class:`Link` keeps one :class:`~radio.digital.DigitalChain` per (modulation, code rate) for its lifetime:
building the LDPC codes costs more than decoding a small payload, so the emulator must not rebuild them per
request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from radio.block import ChannelBlock, ChannelError
from radio.modulation import qam_demodulate_hard, qam_modulate
from radio.spec import ChannelSpec
from wire.payload import EncodedPayload

log = logging.getLogger(__name__)


@dataclass
class LinkResult:
    """A payload as delivered, and the link's accounting for it."""

    payload: EncodedPayload
    symbols: int                      # complex channel uses
    bits: int = 0                     # payload bits carried (digital)
    bit_errors: int = 0               # bits delivered wrong, erasures included (a simulator's count: metrics only)
    erased: list[tuple[int, int]] = field(default_factory=list)  # byte ranges whose code blocks failed the CRC

    @property
    def erased_bytes(self) -> int:
        return sum(end - start for start, end in self.erased)

    def airtime_s(self, spec: ChannelSpec) -> float:
        return self.symbols / spec.link.bandwidth_hz


def generator_for(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded for reproducible runs, else from fresh entropy."""
    gen = torch.Generator("cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def transmit_uncoded(block: ChannelBlock, data: bytes, modulation: str, generator: torch.Generator | None
                     ) -> tuple[bytes, int, int]:
    """Bytes as Gray QAM symbols with hard decisions: (received bytes, symbols, bit errors)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    symbols = qam_modulate(bits, modulation)
    if block.noiseless:
        return bytes(data), int(symbols.numel()), 0
    received, _ = block.equalize_zf(block.transmit(symbols.reshape(1, -1), generator))
    rx_bits = qam_demodulate_hard(received, modulation, bits.size)
    errors = int(np.count_nonzero(rx_bits != bits))
    return np.packbits(rx_bits).tobytes(), int(symbols.numel()), errors


def _bit_errors(sent: bytes, received: bytes) -> int:
    diff = np.frombuffer(sent, np.uint8) ^ np.frombuffer(received, np.uint8)
    return int(np.unpackbits(diff).sum())


class Link:
    """Applies a :class:`ChannelSpec` to payloads. Thread-safe; reuse one instance for many requests."""

    def __init__(self, decode_batch: int = 32) -> None:
        self.decode_batch = decode_batch
        self._chains: dict[tuple[str, Fraction], tuple[object, threading.Lock]] = {}
        self._lock = threading.Lock()

    def check(self, spec: ChannelSpec) -> None:
        """Reject an unusable digital configuration before any work is done (message names the field)."""
        if spec.link.fec == "ldpc":
            from radio.digital import DigitalChainConfig

            try:
                DigitalChainConfig(modulation=spec.link.modulation, code_rate=spec.link.ldpc_rate).validate()
            except ValueError as exc:
                raise ChannelError(f"channel.{exc}") from exc

    def _chain(self, spec: ChannelSpec) -> tuple[object, threading.Lock]:
        from radio.digital import DigitalChain, DigitalChainConfig, parse_rate

        key = (spec.link.modulation, parse_rate(spec.link.ldpc_rate))
        with self._lock:
            if key not in self._chains:
                config = DigitalChainConfig(modulation=key[0], code_rate=key[1], decode_batch=self.decode_batch)
                self._chains[key] = (DigitalChain(config), threading.Lock())
            return self._chains[key]

    def send(self, spec: ChannelSpec, payload: EncodedPayload, generator: torch.Generator | None = None
             ) -> LinkResult:
        """Pass one payload through the link."""
        block = spec.block()
        if payload.kind == "analog":
            symbols = torch.from_numpy(np.ascontiguousarray(payload.symbols, dtype=np.complex64))
            received = block.apply_analog(symbols.reshape(1, -1), generator).reshape(-1).numpy()
            out = EncodedPayload("analog", payload.tensors, payload.params, symbols=received)
            return LinkResult(out, int(received.size))
        if spec.link.fec == "ldpc":
            return self.send_digital_many(spec, [payload], generator)[0]
        data, symbols, errors = transmit_uncoded(block, payload.data, spec.link.modulation, generator)
        out = EncodedPayload("digital", payload.tensors, payload.params, data=data)
        return LinkResult(out, symbols, 8 * len(payload.data), errors)

    def send_digital_many(self, spec: ChannelSpec, payloads: Sequence[EncodedPayload],
                          generator: torch.Generator | None = None) -> list[LinkResult]:
        """Several digital payloads over the LDPC chain, each its own channel realisation, code blocks decoded
        in shared batches (equivalent to :meth:`send` on each in order with the same generator)."""
        chain, lock = self._chain(spec)
        block = spec.block()
        with lock:  # a chain caches Sionna blocks and is not safe for concurrent use
            results = chain.transmit_many([p.data for p in payloads], block, generator)
        out = []
        for payload, res in zip(payloads, results):
            delivered = EncodedPayload("digital", payload.tensors, payload.params, data=res.data)
            out.append(LinkResult(delivered, int(res.symbols), 8 * len(payload.data),
                                  _bit_errors(payload.data, res.data), list(res.erased)))
        return out

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

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np
import torch

from radio import csi
from radio.block import ChannelBlock, ChannelError, ChannelOutput
from radio.modulation import qam_demodulate_hard, qam_modulate
from radio.spec import ChannelSpec
from wire.payload import EncodedPayload

log = logging.getLogger(__name__)


@dataclass
class LinkResult:
    """A payload as delivered, and the link's accounting for it."""

    payload: EncodedPayload
    symbols: int                      # complex channel uses, pilots included
    bits: int = 0                     # payload bits carried (digital)
    bit_errors: int = 0               # bits delivered wrong, erasures included (a simulator's count: metrics only)
    erased: list[tuple[int, int]] = field(default_factory=list)  # byte ranges whose code blocks failed the CRC
    pilot_symbols: int = 0            # channel uses spent on pilots (csi=estimated)
    snr_estimate_db: float | None = None  # what the receiver measured from them

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


def transmit_uncoded(block: ChannelBlock, data: bytes, modulation: str, generator: torch.Generator | None,
                     receiver: Callable[[ChannelOutput], ChannelOutput] | None = None) -> tuple[bytes, int, int]:
    """Bytes as Gray QAM symbols with hard decisions: (received bytes, symbols, bit errors)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    symbols = qam_modulate(bits, modulation)
    if block.noiseless:
        return bytes(data), int(symbols.numel()), 0
    out = block.transmit(symbols.reshape(1, -1), generator)
    received, _ = block.equalize_zf(receiver(out) if receiver is not None else out)
    rx_bits = qam_demodulate_hard(received, modulation, bits.size)
    errors = int(np.count_nonzero(rx_bits != bits))
    return np.packbits(rx_bits).tobytes(), int(symbols.numel()), errors


class _PilotReceiver:
    """The receiver's view of each transmission: the truth with perfect CSI, else its pilot estimates (and the
    pilots' channel uses and SNR estimate, added to the accounting)."""

    def __init__(self, block: ChannelBlock, spec: ChannelSpec, generator: torch.Generator | None) -> None:
        self.block, self.spec, self.generator = block, spec, generator
        self.pilot_symbols = 0
        self.estimates: list[float] = []

    def __call__(self, out: ChannelOutput) -> ChannelOutput:
        if self.spec.link.csi == "perfect" or self.block.noiseless:
            return out
        est = csi.estimate(self.block, out, self.spec.link.pilots, self.generator)
        self.pilot_symbols += est.pilot_symbols
        self.estimates.append(est.snr_db)
        return csi.with_estimated_csi(out, est)

    def account(self, result: LinkResult, share: float = 1.0) -> LinkResult:
        pilots = round(self.pilot_symbols * share)
        result.symbols += pilots
        result.pilot_symbols = pilots
        result.snr_estimate_db = float(np.mean(self.estimates)) if self.estimates else self.spec.snr_db
        return result


@dataclass
class UplinkResult:
    """One control block sent up: what arrived, what it cost, how many tries it took."""

    data: bytes | None               # None when every attempt failed its CRC
    symbols: int
    attempts: int

    def airtime_s(self, spec: ChannelSpec) -> float:
        return self.symbols / spec.link.bandwidth_hz


#: The uplink's own MCS: a few bytes (a token id) protected by CRC + LDPC at the lowest 5G rate, padded to
#: 4-byte granules only (a data chain pads to 16), so a token costs 140 QPSK symbols and survives ~0 dB.
UPLINK_MODULATION = "qpsk"
UPLINK_CODE_RATE = 0.2
UPLINK_GRANULE_BYTES = 4
UPLINK_MAX_ATTEMPTS = 16
#: Coherence blocks a fading link's SNR probe averages over, and the longest block it simulates whole.
PROBE_BLOCKS = 8
PROBE_SPAN_CAP = 4096


def _bit_errors(sent: bytes, received: bytes) -> int:
    diff = np.frombuffer(sent, np.uint8) ^ np.frombuffer(received, np.uint8)
    return int(np.unpackbits(diff).sum())


class Link:
    """Applies a :class:`ChannelSpec` to payloads. Thread-safe; reuse one instance for many requests."""

    def __init__(self, decode_batch: int = 32) -> None:
        self.decode_batch = decode_batch
        self._chains: dict[tuple[str, Fraction, int], tuple[object, threading.Lock]] = {}
        self._lock = threading.Lock()

    def check(self, spec: ChannelSpec) -> None:
        """Reject an unusable digital configuration before any work is done (message names the field)."""
        if spec.link.fec == "ldpc":
            from radio.digital import DigitalChainConfig

            try:
                DigitalChainConfig(modulation=spec.link.modulation, code_rate=spec.link.ldpc_rate).validate()
            except ValueError as exc:
                raise ChannelError(f"channel.{exc}") from exc

    def _chain(self, spec: ChannelSpec, granule_bytes: int = 16) -> tuple[object, threading.Lock]:
        from radio.digital import DigitalChain, DigitalChainConfig, parse_rate

        key = (spec.link.modulation, parse_rate(spec.link.ldpc_rate), granule_bytes)
        with self._lock:
            if key not in self._chains:
                config = DigitalChainConfig(modulation=key[0], code_rate=key[1], decode_batch=self.decode_batch,
                                            granule_bytes=granule_bytes)
                self._chains[key] = (DigitalChain(config), threading.Lock())
            return self._chains[key]

    def send(self, spec: ChannelSpec, payload: EncodedPayload, generator: torch.Generator | None = None
             ) -> LinkResult:
        """Pass one payload through the link."""
        block = spec.block()
        receiver = _PilotReceiver(block, spec, generator)
        if payload.kind == "analog":
            symbols = torch.from_numpy(np.ascontiguousarray(payload.symbols, dtype=np.complex64)).reshape(1, -1)
            out = receiver(block.transmit(symbols, generator))
            if block.noiseless:
                received = out.received
            elif block.fading or spec.link.csi == "estimated":
                received = block.equalize_mmse(out) if block.fading else out.received / out.gains
            else:
                received = out.received
            delivered = EncodedPayload("analog", payload.tensors, payload.params,
                                       symbols=received.reshape(-1).numpy().astype(np.complex64))
            return receiver.account(LinkResult(delivered, int(symbols.numel())))
        if spec.link.fec == "ldpc":
            return self.send_digital_many(spec, [payload], generator)[0]
        data, symbols, errors = transmit_uncoded(block, payload.data, spec.link.modulation, generator, receiver)
        out = EncodedPayload("digital", payload.tensors, payload.params, data=data)
        return receiver.account(LinkResult(out, symbols, 8 * len(payload.data), errors))

    def send_digital_many(self, spec: ChannelSpec, payloads: Sequence[EncodedPayload],
                          generator: torch.Generator | None = None, granule_bytes: int = 16) -> list[LinkResult]:
        """Several digital payloads over the LDPC chain, each its own channel realisation, code blocks decoded
        in shared batches (equivalent to :meth:`send` on each in order with the same generator)."""
        chain, lock = self._chain(spec, granule_bytes)
        block = spec.block()
        receiver = _PilotReceiver(block, spec, generator)
        with lock:  # a chain caches Sionna blocks and is not safe for concurrent use
            results = chain.transmit_many([p.data for p in payloads], block, generator, receiver)
        out = []
        for payload, res in zip(payloads, results):
            delivered = EncodedPayload("digital", payload.tensors, payload.params, data=res.data)
            out.append(receiver.account(LinkResult(delivered, int(res.symbols), 8 * len(payload.data),
                                                   _bit_errors(payload.data, res.data), list(res.erased)),
                                        share=1.0 / len(payloads)))
        return out

    def send_control(self, spec: ChannelSpec, data: bytes, generator: torch.Generator | None = None,
                     max_attempts: int = UPLINK_MAX_ATTEMPTS) -> UplinkResult:
        """A small protected block (e.g. a sampled token id going up) over the request's channel at the
        uplink's own robust MCS, retransmitted until its CRC passes; every attempt costs channel uses."""
        uplink = ChannelSpec(spec.model, spec.params, dataclasses.replace(
            spec.link, modulation=UPLINK_MODULATION, fec="ldpc", code_rate=UPLINK_CODE_RATE))
        payload = EncodedPayload("digital", [], {}, data=data)
        symbols = 0
        for attempt in range(1, max_attempts + 1):
            (result,) = self.send_digital_many(uplink, [payload], generator, UPLINK_GRANULE_BYTES)
            symbols += result.symbols
            if not result.erased:
                return UplinkResult(result.payload.data, symbols, attempt)
        return UplinkResult(None, symbols, max_attempts)

    def probe(self, spec: ChannelSpec, generator: torch.Generator | None = None) -> tuple[float | None, int]:
        """What the receiver can feed back before a transmission: (SNR estimate in dB, pilot symbols spent).

        Perfect CSI reports the configured SNR for free. Estimated CSI sends ``pilots`` per coherence block;
        over :data:`PROBE_BLOCKS` blocks (the pilots of a frame), because what adaptation needs is the mean
        SNR (on a fading channel one block's gain says little about the next ones') and a receiver averages
        what it has seen."""
        if spec.noiseless:
            return None, 0
        if spec.link.csi == "perfect":
            return spec.snr_db, 0
        block = spec.block()
        pilots = spec.link.pilots
        span = min(csi.coherence_of(block, pilots), PROBE_SPAN_CAP) * PROBE_BLOCKS if block.fading else pilots
        out = block.transmit(torch.ones(1, span, dtype=torch.complex64), generator)
        # A channel without fading is one block: the probe's pilots all go into it.
        est = csi.estimate(block, out, pilots if block.fading else pilots * PROBE_BLOCKS, generator)
        return est.snr_db, est.pilot_symbols

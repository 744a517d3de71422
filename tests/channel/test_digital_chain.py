"""The coded digital link (CRC + 5G LDPC + QAM, radio.digital) and the uncoded QAM helper it is
compared with: bit-exact round trips above the cliff, erasures (never exceptions) below it, CRC detection,
config validation, and the uncoded BER against theory."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from radio import ChannelSpec, build_block
from radio.digital import DigitalChain, DigitalChainConfig, DigitalChainResult
from radio.link import Link, transmit_uncoded
from radio.modulation import MODULATIONS, qam_ber_awgn
from codec.base import EncodedPayload, TensorInfo

# Keep Sionna on one thread: the suite shares two cores with other work, and one block decodes fast.
torch.set_num_threads(1)


def _payload(nbytes: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def _channel(model: str, snr_db: float, modulation: str = "qpsk"):
    del modulation  # the block is the channel; the modulation belongs to the transceiver
    return build_block(model, {} if model == "ideal" else {"snr_db": snr_db})


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Uncoded:
    def __init__(self, data: bytes, bit_errors: int) -> None:
        self.data, self.bit_errors = data, bit_errors


def transmit_bytes_uncoded(block, data: bytes, generator: torch.Generator, modulation: str = "qpsk") -> _Uncoded:
    rx, _, errors = transmit_uncoded(block, data, modulation, generator)
    return _Uncoded(rx, errors)


def _bit_errors(a: bytes, b: bytes) -> int:
    x = np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)
    return int(np.unpackbits(x).sum())


@pytest.mark.parametrize("rate", ["1/2", "3/4"])
@pytest.mark.parametrize("modulation", list(MODULATIONS))
def test_high_snr_round_trip_is_bit_exact(modulation: str, rate: str) -> None:
    # 500 bytes: two code blocks, the second zero-padded up to the common block size.
    data = _payload(500, seed=len(modulation))
    chain = DigitalChain(DigitalChainConfig(modulation=modulation, code_rate=rate))
    res = chain.transmit(data, _channel("awgn", 30.0, modulation), _gen(1))
    assert res.data == data
    assert res.erased == [] and res.block_errors == 0 and res.post_fec_bit_errors == 0
    seg = chain.segmentation(len(data))
    assert res.blocks == seg.blocks == 2
    assert res.symbols == seg.symbols == chain.symbols_for(len(data))
    # The code really has the requested rate (never above it) and fills whole symbols.
    assert Fraction(seg.k, seg.n) <= Fraction(rate)
    assert seg.n % MODULATIONS[modulation] == 0
    assert res.info_bits == 8 * len(data)


def test_higher_rate_and_order_need_fewer_symbols() -> None:
    sizes = {(m, r): DigitalChain(DigitalChainConfig(modulation=m, code_rate=r)).symbols_for(2000)
             for m in ("qpsk", "16qam") for r in ("1/2", "3/4")}
    assert sizes[("qpsk", "3/4")] < sizes[("qpsk", "1/2")]
    assert sizes[("16qam", "1/2")] < sizes[("qpsk", "1/2")]
    # QPSK rate 1/2: about one payload bit per symbol (plus CRC and rounding).
    assert 8 * 2000 <= sizes[("qpsk", "1/2")] < 8 * 2000 * 1.05


@pytest.mark.parametrize("model", ["awgn", "rayleigh"])
def test_block_that_fails_becomes_a_reported_erasure(model: str) -> None:
    data = _payload(900, seed=3)
    chain = DigitalChain(DigitalChainConfig(modulation="16qam", code_rate="3/4"))
    res = chain.transmit(data, _channel(model, -10.0, "16qam"), _gen(2))
    assert isinstance(res, DigitalChainResult)
    assert len(res.data) == len(data)
    assert res.block_errors == res.blocks == 3
    assert res.erased == [(0, len(data))] and res.erased_bytes == len(data)
    assert res.data == bytes(len(data))  # erased bytes are zeroed, never garbage
    assert res.block_error_rate == 1.0
    assert res.pre_fec_ber > 0.1


def test_crc_flags_every_wrong_block_in_the_waterfall() -> None:
    """Around the cliff some blocks decode and some do not: every block whose bits are wrong must be an
    erasure (CRC24A misses a wrong block with probability 2^-24), and everything else must be exact."""
    data = _payload(64 * 40, seed=5)
    chain = DigitalChain(DigitalChainConfig(modulation="qpsk", code_rate="1/2", block_bytes=64))
    res = chain.transmit(data, _channel("rayleigh", 3.0), _gen(7))
    assert 0 < res.block_errors < res.blocks, "SNR should sit inside the waterfall for this test"
    assert res.undetected_block_errors == 0
    received = np.frombuffer(res.data, np.uint8)
    sent = np.frombuffer(data, np.uint8)
    outside = np.ones(len(data), bool)
    for start, end in res.erased:
        outside[start:end] = False
        assert not received[start:end].any()
    assert np.array_equal(received[outside], sent[outside])
    assert res.erased_bytes == 64 * res.block_errors


def test_crc_detects_a_corrupted_codeword() -> None:
    """The CRC stage itself: one flipped bit in a CRC-protected block is caught, a clean block passes."""
    chain = DigitalChain(DigitalChainConfig(block_bytes=32, granule_bytes=32))
    seg = chain.segmentation(32)
    code = chain._code(seg.k, seg.n)
    bits = torch.from_numpy(np.unpackbits(np.frombuffer(_payload(32), np.uint8)).astype(np.float32))[None]
    with torch.inference_mode():
        protected = code.crc_encoder(bits)
        _, ok = code.crc_decoder(protected)
        assert bool(ok.all())
        for position in (0, 100, protected.shape[-1] - 1):  # payload bits and a CRC parity bit
            corrupted = protected.clone()
            corrupted[0, position] = 1.0 - corrupted[0, position]
            _, ok = code.crc_decoder(corrupted)
            assert not bool(ok.any()), f"flip at bit {position} not detected"


def test_ideal_channel_delivers_intact_with_honest_symbol_count() -> None:
    data = _payload(700)
    chain = DigitalChain(DigitalChainConfig(modulation="qpsk", code_rate=0.5))
    res = chain.transmit(data, _channel("ideal", 10.0), _gen(0))
    assert res.data == data and res.erased == []
    assert res.symbols == chain.symbols_for(len(data)) > 8 * len(data) // 2


def test_empty_payload_and_seeded_reproducibility() -> None:
    chain = DigitalChain(DigitalChainConfig())
    empty = chain.transmit(b"", _channel("awgn", 0.0), _gen(0))
    assert empty.data == b"" and empty.symbols == 0 and empty.blocks == 0
    data = _payload(400)
    runs = [chain.transmit(data, _channel("awgn", 0.5), _gen(11)) for _ in range(2)]
    assert runs[0].data == runs[1].data and runs[0].erased == runs[1].erased
    assert runs[0].pre_fec_bit_errors == runs[1].pre_fec_bit_errors


@pytest.mark.parametrize("field, value", [
    ("modulation", "8psk"), ("code_rate", 0.1), ("code_rate", 0.99), ("code_rate", "one half"),
    ("crc", "CRC32"), ("block_bytes", 0), ("block_bytes", 5000), ("granule_bytes", 0),
    ("bp_iterations", 0), ("demapping", "hard"), ("cn_update", "magic"), ("decode_batch", 0),
])
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        DigitalChain(DigitalChainConfig(**{field: value}))


def test_segmentation_rejects_negative_size() -> None:
    with pytest.raises(ValueError, match="nbytes"):
        DigitalChain(DigitalChainConfig()).segmentation(-1)


@pytest.mark.parametrize("modulation, snr_db", [("bpsk", 4.0), ("qpsk", 7.0), ("16qam", 14.0), ("64qam", 20.0)])
def test_uncoded_qam_ber_matches_theory(modulation: str, snr_db: float) -> None:
    """Hard-decision Gray QAM on AWGN against the exact closed form: statistical, so the bounds are a factor
    1.25 either way (~240k bits at BER ~1e-2)."""
    theory = qam_ber_awgn(snr_db, modulation)
    assert 1e-3 < theory < 5e-2, "pick SNRs where a few thousand bits measure the BER"
    data = _payload(30_000, seed=13)
    res = transmit_bytes_uncoded(_channel("awgn", snr_db), data, _gen(17), modulation)
    measured = res.bit_errors / (8 * len(data))
    assert res.bit_errors == _bit_errors(res.data, data)
    assert theory / 1.25 < measured < theory * 1.25, f"{modulation} @ {snr_db} dB: {measured:.2e} vs {theory:.2e}"


def test_uncoded_ber_falls_with_snr_and_ldpc_beats_uncoded_at_same_snr() -> None:
    data = _payload(2000, seed=19)
    bers = [transmit_bytes_uncoded(_channel("awgn", s), data, _gen(0)).bit_errors
            for s in (0.0, 5.0, 10.0)]
    assert bers[0] > bers[1] > bers[2]
    coded = DigitalChain(DigitalChainConfig(modulation="qpsk", code_rate="1/2")).transmit(
        data, _channel("awgn", 5.0), _gen(0))
    assert coded.data == data and bers[1] > 0  # rate 1/2 LDPC at 5 dB is error-free; raw QPSK is not


def test_service_link_reports_ldpc_erasures_as_bit_errors() -> None:
    """The emulator's link with fec=ldpc: clean above the cliff, and below it the delivered bytes'
    bit errors are counted (so the device knows to conceal), never an exception."""
    data = _payload(600, seed=23)
    payload = EncodedPayload("digital", [TensorInfo("latents", (1, 4, 16, 16))], {}, data=data)
    link = Link()
    good = link.send(ChannelSpec.create("awgn", snr_db=15.0, fec="ldpc", code_rate=0.5), payload, _gen(0))
    assert good.payload.data == data and good.bit_errors == 0 and good.bits == 8 * len(data)
    assert good.symbols == DigitalChain(DigitalChainConfig(code_rate=0.5)).symbols_for(len(data))
    bad = link.send(ChannelSpec.create("awgn", snr_db=-5.0, fec="ldpc", code_rate=0.5), payload, _gen(0))
    assert bad.erased == [(0, len(data))]  # the PHY's CRC status travels with the delivery
    assert len(bad.payload.data) == len(data)
    assert bad.bit_errors == _bit_errors(bad.payload.data, data) > 0


@pytest.mark.parametrize("model, snr_db", [("awgn", 3.0), ("rayleigh", 10.0)])
def test_batched_transmission_equals_sequential(model: str, snr_db: float) -> None:
    """transmit_many (shared decoder batches, used by the benchmark) gives what payload-by-payload calls give."""
    payloads = [_payload(n, seed=n) for n in (90, 0, 200, 90, 700, 33)]
    chain = DigitalChain(DigitalChainConfig(modulation="qpsk", code_rate="2/3", decode_batch=4))
    channel = _channel(model, snr_db)
    batched = chain.transmit_many(payloads, channel, _gen(5))
    rng = _gen(5)
    sequential = [chain.transmit(p, channel, rng) for p in payloads]
    assert len(batched) == len(payloads)
    for b, s, p in zip(batched, sequential, payloads):
        assert len(b.data) == len(p)
        assert (b.data, b.erased, b.symbols, b.blocks) == (s.data, s.erased, s.symbols, s.blocks)
        assert abs(b.pre_fec_bit_errors - s.pre_fec_bit_errors) <= 2  # float rounding in batched demapping
    assert sum(r.block_errors for r in batched) < sum(r.blocks for r in batched)  # not everything lost

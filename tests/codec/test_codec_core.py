"""Round trips, real rates and clean errors of the stage-one codecs (raw-fp16, uint8, analog)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec.base import CodecError, EncodedPayload


def latents(seed: int = 0, shape: tuple[int, ...] = (1, 4, 16, 16)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(shape, generator=g) * 2.5 + 0.3}


def test_raw_fp16_round_trip_and_rate() -> None:
    x = latents()
    c = codec.build_codec("raw-fp16")
    p = c.encode(x)
    assert p.kind == "digital" and p.bits_sent == 16 * x["latents"].numel() == 8 * len(p.data)
    y = c.decode(p)["latents"]
    assert torch.allclose(y, x["latents"].half().float())


def test_uint8_round_trip_bounded_and_compresses() -> None:
    x = latents(1)
    c = codec.build_codec("uint8")
    p = c.encode(x)
    y = c.decode(p)["latents"]
    span = float(x["latents"].max() - x["latents"].min())
    assert float((y - x["latents"]).abs().max()) <= span / 255 / 2 + 1e-5
    assert p.bits_sent == 8 * len(p.data) < 8 * x["latents"].numel()  # the entropy coder beats 8 bits/value


def test_uint8_is_bit_exact_on_quantised_values() -> None:
    c = codec.build_codec("uint8")
    once = c.decode(c.encode(latents(2)))
    twice = c.decode(c.encode(once))
    assert torch.allclose(once["latents"], twice["latents"], atol=1e-5)


def test_uint8_golden_bitstream() -> None:
    """A silent change of the bitstream format breaks devices in the field: pin it."""
    data = codec.build_codec("uint8").encode(latents(3)).data
    assert hashlib.sha256(data).hexdigest()[:16] == GOLDEN_UINT8


GOLDEN_UINT8 = "798cbecda4d54ac8"


def test_analog_unit_power_and_exact_inverse() -> None:
    x = latents(4)
    c = codec.build_codec("analog")
    p = c.encode(x)
    assert p.kind == "analog" and p.symbols_sent == x["latents"].numel() // 2
    assert np.mean(np.abs(p.symbols) ** 2) == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(c.decode(p)["latents"], x["latents"], atol=1e-5)
    assert p.bits_sent > 0  # the gain side information is counted


def test_several_named_tensors_travel_together() -> None:
    x = {"a": torch.randn(1, 4, 8, 8), "hidden": torch.randn(1, 7, 32)}
    for name in ("raw-fp16", "uint8", "analog"):
        c = codec.build_codec(name)
        y = c.decode(c.encode(x))
        assert set(y) == set(x) and all(y[k].shape == x[k].shape for k in x)


def test_unknown_codec_and_bad_params() -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        codec.build_codec("nope")
    with pytest.raises(CodecError, match="bits"):
        codec.build_codec("uint8", {"bits": "12"})


@pytest.mark.parametrize("name", ["raw-fp16", "uint8"])
def test_truncated_digital_payloads_raise_codec_error(name: str) -> None:
    c = codec.build_codec(name)
    p = c.encode(latents(5))
    for cut in (0, 1, 3, len(p.data) // 2, len(p.data) - 1):
        broken = EncodedPayload("digital", p.tensors, p.params, data=p.data[:cut])
        with pytest.raises(CodecError):
            c.decode(broken)


def test_analog_wrong_symbol_count_and_bad_side_info() -> None:
    c = codec.build_codec("analog")
    p = c.encode(latents(6))
    with pytest.raises(CodecError):
        c.decode(EncodedPayload("analog", p.tensors, p.params, symbols=p.symbols[:-1]))
    with pytest.raises(CodecError):
        c.decode(EncodedPayload("analog", p.tensors, {**p.params, "side_info": "!!notbase64"}, symbols=p.symbols))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from(["raw-fp16", "uint8"]))
def test_random_bytes_never_crash_the_decoders(blob: bytes, name: str) -> None:
    c = codec.build_codec(name)
    template = c.encode(latents(7, (1, 4, 4, 4)))
    try:
        out = c.decode(EncodedPayload("digital", template.tensors, template.params, data=blob))
    except CodecError:
        return
    assert torch.isfinite(out["latents"]).all()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40))
def test_bit_flips_in_uint8_streams_give_finite_output_or_codec_error(seed: int, flips: int) -> None:
    c = codec.build_codec("uint8")
    p = c.encode(latents(seed % 17, (1, 4, 8, 8)))
    rng = np.random.default_rng(seed)
    data = bytearray(p.data)
    for pos in rng.integers(0, 8 * len(data), flips):
        data[pos // 8] ^= 1 << (pos % 8)
    try:
        out = c.decode(EncodedPayload("digital", p.tensors, p.params, data=bytes(data)))
    except CodecError:
        return
    assert torch.isfinite(out["latents"]).all()

"""Channels that change (issue 14): SNR traces and named profiles, the link fields that must cross the wire,
and the pilot-based SNR probe that link adaptation chooses from."""

from __future__ import annotations

import numpy as np
import pytest

from radio import ChannelError, ChannelSpec
from radio.link import Link, generator_for
from radio.trace import PROFILES, profile_trace, snr_at


def test_a_profile_expands_to_a_trace_that_follows_time() -> None:
    spec = ChannelSpec.create("awgn", snr_profile="walk-away")
    trace = profile_trace("walk-away")
    step = spec.link.trace_step_ms
    assert spec.snr_db == trace[0] and trace[0] > trace[-1]
    assert spec.at(0.0).snr_db == trace[0]
    assert spec.at(10 * step + 0.5).snr_db == trace[10]
    assert spec.at(1e9).snr_db == trace[-1]  # the last value holds after the trace ends
    constant = ChannelSpec.create("awgn", snr_db=3.0)
    assert constant.at(1e6) is constant


def test_every_profile_is_a_valid_trace() -> None:
    for name in PROFILES:
        trace = profile_trace(name)
        assert len(trace) > 1 and all(-60.0 <= v <= 80.0 for v in trace)
        assert ChannelSpec.create("rayleigh", snr_profile=name).link.trace == trace
    assert snr_at((1.0, 2.0, 3.0), 10.0, -5.0) == 1.0


def test_the_link_fields_cross_the_wire() -> None:
    # csi, pilots and the feedback delay used to be dropped by to_proto: the emulator never estimated anything.
    spec = ChannelSpec.create("rayleigh", snr_db=4.0, csi="estimated", pilots=16, feedback_delay_ms=3.0)
    assert ChannelSpec.from_proto(spec.to_proto()) == spec
    traced = ChannelSpec.create("awgn", snr_trace_db=[20, 5, -5], trace_step_ms=50.0)
    back = ChannelSpec.from_proto(traced.to_proto())
    assert back.link.trace == (20.0, 5.0, -5.0) and back.link.trace_step_ms == 50.0 and back.snr_db == 20.0
    profiled = ChannelSpec.from_proto(ChannelSpec.create("awgn", snr_profile="tunnel").to_proto())
    assert profiled.link.trace == profile_trace("tunnel")


@pytest.mark.parametrize("values, field", [
    ({"model": "awgn", "snr_db": 5, "snr_profile": "tunnel"}, "channel.snr_profile"),
    ({"model": "ideal", "snr_trace_db": [5]}, "channel.snr_trace_db"),
    ({"model": "awgn", "snr_trace_db": []}, "channel.snr_trace_db"),
    ({"model": "awgn", "snr_trace_db": [5, "x"]}, "channel.snr_trace_db"),
    ({"model": "awgn", "snr_trace_db": [500]}, "channel.snr_trace_db"),
    ({"model": "awgn", "snr_trace_db": "5,6"}, "channel.snr_trace_db"),
    ({"model": "awgn", "snr_profile": "moon"}, "channel.snr_profile"),
    ({"model": "awgn", "snr_profile": "tunnel", "snr_trace_db": [1, 2]}, "channel.snr_profile"),
    ({"model": "awgn", "snr_trace_db": [1], "trace_step_ms": 0}, "channel.trace_step_ms"),
])
def test_bad_traces_are_refused_naming_the_field(values: dict, field: str) -> None:
    with pytest.raises(ChannelError, match=field.replace(".", r"\.")):
        ChannelSpec.from_mapping(values)


@pytest.mark.parametrize("model", ["awgn", "rayleigh"])
def test_the_probe_estimates_the_mean_snr_from_pilots_with_error(model: str) -> None:
    link, gen = Link(), generator_for(0)
    spec = ChannelSpec.create(model, snr_db=10.0, csi="estimated")
    probes = [link.probe(spec, gen) for _ in range(200)]
    assert {pilots for _, pilots in probes} == {64}  # 8 blocks of 8 pilots, all counted
    values = np.array([snr for snr, _ in probes])
    assert abs(values.mean() - 10.0) < 1.0  # unbiased to within a dB ...
    assert values.std() > 0.1               # ... but an estimate, not the truth
    assert link.probe(ChannelSpec.create(model, snr_db=10.0), gen) == (10.0, 0)  # perfect CSI: free and exact

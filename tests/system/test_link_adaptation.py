"""Codec ``auto`` (link adaptation) through the real testbed: the edge chooses the scheme from the measured
table at the receiver's SNR estimate, the channel emulator applies a digital scheme's transceiver, and the
device names what was chosen and why."""

from __future__ import annotations

import httpx
import pytest

from codec.adaptation import AdaptationTable
from codec.image_sets import image_set_dir

PROMPT = "a red circle on a white background"


def generate(bed, **fields: object) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"prompt": PROMPT, "seed": 1, "steps": 8, "codec": "auto", **fields}
    return httpx.post(f"{bed.url}/v1/generate", json=body, timeout=120)


def test_auto_chooses_analog_at_minus_5_db_and_digital_at_25_db(testbed, testbed_model_dir) -> None:  # type: ignore[no-untyped-def]
    table = AdaptationTable.load(image_set_dir(testbed_model_dir) / "adaptation.json")
    low = generate(testbed, channel={"model": "awgn", "snr_db": -5.0})
    assert low.status_code == 200, low.text
    choice = low.json()["codec_choice"]
    assert low.json()["codec"] == "auto" and choice["link"] is None
    assert choice["codec"] in {s.codec for s in table.channels["awgn"] if s.kind == "analog"}
    assert "estimated" in choice["reason"] and abs(choice["snr_estimate_db"] + 5.0) < 1e-6

    high = generate(testbed, channel={"model": "awgn", "snr_db": 25.0})
    assert high.status_code == 200, high.text
    out = high.json()
    assert out["codec_choice"]["link"] is not None and out["concealed"] is False
    assert out["codec_choice"]["codec"] in {s.codec for s in table.channels["awgn"] if s.kind == "digital"}
    assert out["channel"]["modulation"] == out["codec_choice"]["link"]["modulation"]


def test_auto_respects_a_channel_use_budget(testbed) -> None:  # type: ignore[no-untyped-def]
    out = generate(testbed, channel={"model": "awgn", "snr_db": 25.0}, codec_params={"budget_symbols": "1000"})
    assert out.status_code == 200, out.text
    assert out.json()["symbols_sent"] <= 1000 + 64  # pilots and side information ride on top of the payload
    too_small = generate(testbed, channel={"model": "awgn", "snr_db": 25.0}, codec_params={"budget_symbols": "10"})
    assert too_small.status_code == 422 and "budget_symbols" in too_small.json()["detail"]


@pytest.mark.parametrize("fields, field", [
    ({"channel": {"model": "awgn", "snr_db": 5.0, "fec": "ldpc"}}, "channel.fec"),
    ({"codec_params": {"bits": "4"}}, "codec_params.bits"),
])
def test_auto_refuses_what_it_would_choose(testbed, fields: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    r = generate(testbed, **fields)
    assert r.status_code == 422 and r.json()["detail"].startswith(field), r.text


def test_estimated_csi_reaches_the_emulator_and_a_trace_moves_while_the_edge_computes(testbed) -> None:  # type: ignore[no-untyped-def]
    estimated = generate(testbed, channel={"model": "awgn", "snr_db": 10.0, "csi": "estimated"})
    assert estimated.status_code == 200, estimated.text
    snr_estimate = estimated.json()["codec_choice"]["snr_estimate_db"]
    assert snr_estimate != 10.0 and abs(snr_estimate - 10.0) < 6.0  # from pilots: close, never exact

    # The link is at 25 dB when the request arrives and at -10 dB one millisecond later, long before the edge
    # has denoised: auto chooses a digital scheme for 25 dB and the payload meets -10 dB.
    stale = generate(testbed, channel={"model": "awgn", "snr_trace_db": [25.0, -10.0], "trace_step_ms": 1.0},
                     codec_params={"budget_symbols": "1000"})
    assert stale.status_code == 200, stale.text
    out = stale.json()
    assert out["codec_choice"]["snr_estimate_db"] == 25.0 and out["codec_choice"]["link"] is not None
    assert out["channel"]["snr_applied_db"] == -10.0 and out["channel"]["snr_trace_db"] == [25.0, -10.0]
    assert out["codec_choice"]["link"]["fec"] == "ldpc"
    assert out["concealed"] is True, str(out)  # the stale estimate's price: the digital payload did not survive
    scraped = httpx.get(f"http://127.0.0.1:{testbed.channel_metrics_port}/metrics", timeout=5).text
    assert 'meg_link_snr_db{channel="awgn",service="channel"} -10.0' in scraped
    assert 'meg_link_snr_estimate_db{channel="awgn",service="channel"} 25.0' in scraped

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

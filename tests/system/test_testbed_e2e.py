"""End to end through three real processes: REST → device → gRPC → channel emulator → gRPC → edge."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from conftest import Testbed

PROMPT = "a red circle on a white background"


def post(bed: Testbed, body: dict, timeout: float = 90.0) -> httpx.Response:
    return httpx.post(f"{bed.url}/v1/generate", json=body, timeout=timeout)


@pytest.mark.parametrize("codec", ["raw-fp16", "uint8", "analog"])
@pytest.mark.parametrize("channel", [
    {"model": "ideal"},
    {"model": "awgn", "snr_db": 5},
    {"model": "rayleigh", "snr_db": 10, "coherence_symbols": 32},
    {"model": "rician", "snr_db": 10, "k_factor": 3},
])
def test_generate_across_channels_and_codecs(testbed: Testbed, codec: str, channel: dict) -> None:
    resp = post(testbed, {"prompt": PROMPT, "seed": 7, "steps": 4, "codec": codec, "channel": channel,
                          "reference": True})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    for key in ("id", "image_url", "width", "height", "codec", "channel", "bits_sent", "symbols_sent",
                "airtime_ms", "timings_ms", "quality"):
        assert key in out
    assert set(out["timings_ms"]) == {"edge", "encode", "channel", "decode", "total"}
    assert out["codec"] == codec and out["channel"]["model"] == channel["model"]
    assert out["symbols_sent"] > 0 and out["airtime_ms"] > 0
    png = httpx.get(testbed.url + out["image_url"], timeout=10)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (out["width"], out["height"])
    assert {"psnr_db", "ms_ssim"} <= set(out["quality"])
    if channel["model"] == "ideal" and codec in ("raw-fp16", "analog"):
        assert out["quality"]["psnr_db"] > 40  # only fp16 rounding separates it from the clean decode
    if codec == "analog":
        # Two latent values a complex symbol; the only bits are the side information (the mapper's scale).
        latent_values = 4 * (out["height"] // 4) * (out["width"] // 4) if out["height"] == 64 else None
        assert out["bits_sent"] < 1024
        assert latent_values is None or out["symbols_sent"] == latent_values // 2


def test_bits_sent_is_the_encoded_payload_size(testbed: Testbed) -> None:
    """raw-fp16 sends 16 bits a latent value; uint8's rANS stream is smaller than 8 bits a value."""
    out = post(testbed, {"prompt": PROMPT, "seed": 1, "steps": 2, "codec": "raw-fp16"}).json()
    latent_values = 4 * (out["height"] // 4) * (out["width"] // 4) if out["height"] == 64 else None
    if latent_values:
        assert out["bits_sent"] == 16 * latent_values
    # QPSK carries 2 bits a symbol on the digital link
    assert out["symbols_sent"] == out["bits_sent"] // 2
    small = post(testbed, {"prompt": PROMPT, "seed": 1, "steps": 2, "codec": "uint8"}).json()
    assert 0 < small["bits_sent"] < out["bits_sent"] // 2 + 512


def test_airtime_follows_bandwidth(testbed: Testbed) -> None:
    body = {"prompt": PROMPT, "seed": 3, "steps": 1, "codec": "raw-fp16",
            "channel": {"model": "ideal", "bandwidth_hz": 1e5, "delay_ms": 50}}
    out = post(testbed, body).json()
    assert out["airtime_ms"] == pytest.approx(1e3 * out["symbols_sent"] / 1e5)
    assert out["timings_ms"]["channel"] >= out["airtime_ms"] + 50 - 1  # paced in wall-clock time


def test_seed_reproducible_and_noise_hurts(testbed: Testbed) -> None:
    a = post(testbed, {"prompt": PROMPT, "seed": 11, "steps": 3, "codec": "raw-fp16"}).json()
    b = post(testbed, {"prompt": PROMPT, "seed": 11, "steps": 3, "codec": "raw-fp16"}).json()
    pa = httpx.get(testbed.url + a["image_url"]).content
    pb = httpx.get(testbed.url + b["image_url"]).content
    assert pa == pb
    noisy = post(testbed, {"prompt": PROMPT, "seed": 11, "steps": 3, "codec": "analog", "reference": True,
                           "channel": {"model": "awgn", "snr_db": -10, "seed": 1}}).json()
    clean = post(testbed, {"prompt": PROMPT, "seed": 11, "steps": 3, "codec": "analog", "reference": True,
                           "channel": {"model": "awgn", "snr_db": 30, "seed": 1}}).json()
    assert noisy["quality"]["psnr_db"] < clean["quality"]["psnr_db"]


def test_digital_bit_errors_are_concealed_not_fatal(testbed: Testbed) -> None:
    out = post(testbed, {"prompt": PROMPT, "seed": 5, "steps": 2, "codec": "uint8",
                         "channel": {"model": "awgn", "snr_db": -5, "modulation": "64qam", "seed": 2}})
    assert out.status_code == 200, out.text
    assert out.json()["bit_errors"] > 0


def test_split_point_device_finishes_the_steps(testbed: Testbed) -> None:
    full = post(testbed, {"prompt": PROMPT, "seed": 9, "steps": 4, "codec": "raw-fp16", "decoder": "vae"}).json()
    split = post(testbed, {"prompt": PROMPT, "seed": 9, "steps": 4, "split_step": 2, "codec": "raw-fp16",
                           "decoder": "vae", "reference": True}).json()
    assert split["width"] == full["width"]
    # fp16 transport of the intermediate latent changes the result only by rounding
    assert split["quality"]["psnr_db"] > 30


@pytest.mark.parametrize("body, field", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 501}, "prompt"),
    ({"prompt": PROMPT, "codec": "nope"}, "codec"),
    ({"prompt": PROMPT, "channel": {"model": "wormhole"}}, "channel.model"),
    ({"prompt": PROMPT, "channel": {"model": "awgn", "snr_db": 61}}, "channel.snr_db"),
    ({"prompt": PROMPT, "channel": {"model": "awgn", "snr_db": -31}}, "channel.snr_db"),
    ({"prompt": PROMPT, "steps": 0}, "steps"),
    ({"prompt": PROMPT, "steps": 201}, "steps"),
    ({"prompt": PROMPT, "unknown_field": 1}, "unknown_field"),
    ({"prompt": PROMPT, "steps": 4, "split_step": 4}, "split_step"),
])
def test_bad_input_is_422_naming_the_field(testbed: Testbed, body: dict, field: str) -> None:
    resp = post(testbed, body)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["detail"]


def test_listing_endpoints(testbed: Testbed) -> None:
    codecs = httpx.get(f"{testbed.url}/v1/codecs").json()["codecs"]
    assert {"raw-fp16", "uint8", "analog"} <= {c["name"] for c in codecs}
    channels = httpx.get(f"{testbed.url}/v1/channels").json()["channels"]
    assert {"ideal", "awgn", "rayleigh", "rician"} <= {c["name"] for c in channels}
    assert httpx.get(f"{testbed.url}/v1/images/doesnotexist.png").status_code == 404
    assert httpx.get(f"{testbed.url}/openapi.json").status_code == 200


def test_device_metrics_exposed(testbed: Testbed) -> None:
    post(testbed, {"prompt": PROMPT, "seed": 2, "steps": 1})
    text = httpx.get(f"{testbed.url}/metrics").text
    assert 'meg_stage_seconds_count{' in text and 'stage="end_to_end"' in text
    edge = httpx.get(f"http://127.0.0.1:{testbed.edge_metrics_port}/metrics").text
    assert 'stage="denoise"' in edge
    channel = httpx.get(f"http://127.0.0.1:{testbed.channel_metrics_port}/metrics").text
    assert 'stage="airtime"' in channel


def test_every_service_exports_metrics_promtool_accepts(testbed: Testbed) -> None:
    """`curl -s 127.0.0.1:8000/metrics | promtool check metrics` prints nothing, for all three services, after
    requests have filled the histograms (Prometheus' naming rules: base units, _total counters)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (.ci/test-packages.txt)"
    assert post(testbed, {"prompt": PROMPT, "steps": 2, "codec": "uint8", "reference": True,
                          "channel": {"model": "awgn", "snr_db": 8}}).status_code == 200
    for url in (f"{testbed.url}/metrics", f"http://127.0.0.1:{testbed.edge_metrics_port}/metrics",
                f"http://127.0.0.1:{testbed.channel_metrics_port}/metrics"):
        text = httpx.get(url, timeout=10).text
        assert "_bucket{" in text, url
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), \
            f"{url}: {check.stdout}{check.stderr}"

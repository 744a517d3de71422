"""Channel science through the real testbed (REST → device → channel emulator → edge): the LDPC digital chain
with learned and classic entropy coders, concealment below the digital cliff, the learned JSCC links, and
every listed codec and channel accepted per request. Also: the ``meg generate`` flags that select them."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from radio.digital import DigitalChain, DigitalChainConfig
from codec.image_sets import image_set_dir
from models import DEFAULT_MODEL_DIR
from conftest import Testbed
from meg_cli.main import _parser

#: The embedded model's image codec set, where its JSCC links live.
PACKAGE_WEIGHTS = image_set_dir(DEFAULT_MODEL_DIR)

PROMPT = "a blue square on a black background"
STEPS = 2  # the link, not the image, is under test here


def post(bed: Testbed, body: dict, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(f"{bed.url}/v1/generate", json={"prompt": PROMPT, "seed": 3, "steps": STEPS, **body},
                      timeout=timeout)


def fetch_png(bed: Testbed, out: dict) -> Image.Image:
    resp = httpx.get(bed.url + out["image_url"], timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(resp.content))
    assert image.size == (out["width"], out["height"])
    return image


def jscc_weights_missing(codec_name: str) -> bool:
    model = {"jscc": "jscc_full", "e2e-meg": "jscc_e2e"}.get(codec_name)
    return model is not None and not (PACKAGE_WEIGHTS / f"{model}.safetensors").is_file()


@pytest.mark.parametrize("codec", ["hyperprior", "uint8"])
def test_ldpc_link_above_the_cliff_is_clean(testbed: Testbed, codec: str) -> None:
    channel = {"model": "awgn", "snr_db": 15, "fec": "ldpc", "code_rate": 0.5}
    resp = post(testbed, {"codec": codec, "channel": channel, "reference": True})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    fetch_png(testbed, out)
    assert out["codec"] == codec and out["channel"]["fec"] == "ldpc"
    assert out["channel"]["modulation"] == "qpsk"
    assert out["bit_errors"] == 0 and out["concealed"] is False
    # The symbols are those of the CRC + LDPC rate-1/2 QPSK code, not of uncoded QPSK (bits / 2).
    payload_bytes = out["bits_sent"] // 8
    assert out["symbols_sent"] == DigitalChain(DigitalChainConfig(code_rate=0.5)).symbols_for(payload_bytes)
    assert out["symbols_sent"] >= out["bits_sent"]
    assert out["quality"]["psnr_db"] > 15  # lossy coding, but the right image


@pytest.mark.parametrize("codec", ["hyperprior", "uint8"])
def test_ldpc_link_below_the_cliff_is_concealed_not_crashed(testbed: Testbed, codec: str) -> None:
    """At −5 dB every rate-1/2 QPSK block fails its CRC: the blocks are erased, the payload's own check
    fails, and the device conceals (mid-grey latent) and answers 200 with ``concealed`` set."""
    channel = {"model": "awgn", "snr_db": -5, "fec": "ldpc", "code_rate": 0.5, "seed": 1}
    resp = post(testbed, {"codec": codec, "channel": channel})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["concealed"] is True and out["bit_errors"] > 0
    fetch_png(testbed, out)
    assert "Traceback" not in testbed.log_text("device")
    assert "Traceback" not in testbed.log_text("channel")


@pytest.mark.parametrize("codec", ["jscc", "e2e-meg"])
@pytest.mark.parametrize("channel", [{"model": "awgn", "snr_db": 0}, {"model": "rayleigh", "snr_db": 10}])
def test_learned_jscc_links(testbed: Testbed, codec: str, channel: dict) -> None:
    if jscc_weights_missing(codec):
        pytest.skip(f"{codec} weights are not trained yet (meg train codecs --source image --model-dir DIR)")
    resp = post(testbed, {"codec": codec, "channel": channel, "reference": True})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    fetch_png(testbed, out)
    assert out["channel"]["modulation"] == "analog" and out["concealed"] is False
    # 4x16x16 latent values: JSCC sends 0.5 symbols a value, E2E-MEG merges half the tokens first.
    values = 4 * (out["height"] // 4) * (out["width"] // 4)
    assert 0 < out["symbols_sent"] <= values // 2
    if codec == "e2e-meg":
        assert out["symbols_sent"] < values // 2
        assert out["bits_sent"] > 0  # the merge map is counted side information
    assert 0 < out["quality"]["psnr_db"] < 100 and 0 <= out["quality"]["ms_ssim"] <= 1


def test_every_listed_codec_is_accepted(testbed: Testbed) -> None:
    listing = httpx.get(f"{testbed.url}/v1/codecs", timeout=10).json()
    names = [c["name"] for c in listing["codecs"]]
    assert {"raw-fp16", "uint8", "analog", "hyperprior", "dtufc+gained", "fcm+gained", "elic",
            "jscc", "e2e-meg"} <= set(names)
    for item in listing["codecs"]:
        assert item["kind"] in ("digital", "analog") and item["description"] and item["stages"]
        assert isinstance(item["params"], dict)
    by_name = {c["name"]: c for c in listing["codecs"]}
    # Parameters are shown: the learned presets name their model, domain and quality; E2E-MEG its merge ratio.
    assert by_name["dtufc+gained"]["params"]["learned_domain"] == "dtufc"
    assert by_name["hyperprior"]["params"]["learned_model"] == "hyperprior"
    assert by_name["e2e-meg"]["params"]["merge_ratio"] == "0.5"
    assert by_name["e2e-meg"]["stages"] == ["merge", "jscc"]

    failures = {}
    for name in names:
        if jscc_weights_missing(name):
            continue
        # Digital payloads over the ideal link (LDPC decoding is covered above and costs CPU); analog ones
        # over AWGN, so SNR-adaptive codecs get their SNR side information.
        analog = by_name[name]["kind"] == "analog"
        channel = {"model": "awgn", "snr_db": 20} if analog else {"model": "ideal", "fec": "ldpc"}
        resp = post(testbed, {"codec": name, "channel": channel})
        if resp.status_code != 200:
            failures[name] = f"{resp.status_code}: {resp.text[:200]}"
            continue
        out = resp.json()
        if out["codec"] != name or out["symbols_sent"] <= 0:
            failures[name] = f"bad answer {out}"
    assert not failures, failures


def test_every_listed_channel_is_accepted(testbed: Testbed) -> None:
    listing = httpx.get(f"{testbed.url}/v1/channels", timeout=10).json()["channels"]
    names = [c["name"] for c in listing]
    assert set(names) >= {"ideal", "awgn", "rayleigh", "rician"}
    for item in listing:
        assert item["description"] and isinstance(item["parameters"], list)
        assert ("snr_db" in item["parameters"]) == (not item["noiseless"])
    assert "k_factor" in next(c for c in listing if c["name"] == "rician")["parameters"]
    for item in listing:
        snr = {} if item["noiseless"] else {"snr_db": 10}
        resp = post(testbed, {"codec": "analog", "channel": {"model": item["name"], **snr}})
        assert resp.status_code == 200, f"{item['name']}: {resp.text}"
        assert resp.json()["channel"]["model"] == item["name"]


def test_bad_fec_and_code_rate_are_rejected_by_name(testbed: Testbed) -> None:
    resp = post(testbed, {"codec": "uint8", "channel": {"model": "awgn", "fec": "turbo"}})
    assert resp.status_code == 422 and "channel.fec" in resp.text
    resp = post(testbed, {"codec": "uint8", "channel": {"model": "awgn", "fec": "ldpc", "code_rate": 1.5}})
    assert resp.status_code == 422 and "channel.code_rate" in resp.text
    # In (0, 1) but below the lowest 5G LDPC rate: the emulator rejects it by name before any edge work.
    resp = post(testbed, {"codec": "uint8", "channel": {"model": "awgn", "fec": "ldpc", "code_rate": 0.1}})
    assert resp.status_code == 422 and "channel.code_rate" in resp.text, resp.text


def test_cli_generate_selects_codec_channel_fec_and_rate() -> None:
    args = _parser().parse_args(["generate", "a prompt", "--codec", "dtufc+gained", "--channel", "rayleigh",
                                 "--snr-db", "3", "--modulation", "16qam", "--fec", "ldpc", "--code-rate", "0.75"])
    assert (args.codec, args.channel, args.snr_db) == ("dtufc+gained", "rayleigh", 3.0)
    assert (args.modulation, args.fec, args.code_rate) == ("16qam", "ldpc", 0.75)
    with pytest.raises(SystemExit):
        _parser().parse_args(["generate", "a prompt", "--fec", "turbo"])

"""Hidden-state codecs (source ``llm-hidden``): round trips, exactness, error bounds, the outlier side channel,
rate accounting, fitted-set errors and malformed payloads. Uses the committed codec set of the embedded LLM
(``models/shapes_llm_v1/codecs/llm-hidden-k2``) and synthetic hidden states of its size; no model runs except
in the small fitting test."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import codec
from codec.base import CodecError, EncodedPayload
from codec.hidden_quant import fwht, hadamard_signs
from codec.sets import codec_set_dir
from codec.registry import codec_kind, list_codecs
from models.llm import DEFAULT_LLM_DIR

SET_DIR = codec_set_dir(DEFAULT_LLM_DIR, 2)
HIDDEN = codec.codec_names("llm-hidden")
#: The clipping or quantising terminals the outlier side channel protects, and their +ol presets.
CLIPPING = ("int8-token", "hadamard4", "fcm-hidden")


def hidden(rows: int = 9, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Hidden-state-like rows: heavy-ish tails, median |h| about 2 (like the embedded model's)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, rows, d, generator=g) * 2.5 + 0.3 * torch.randn(1, 1, d, generator=g)


def build(name: str, **params: str) -> codec.Codec:
    return codec.build_codec(name, {"channel_snr_db": "20", **params} if codec_kind(name) == "analog" else params,
                             SET_DIR)


def test_registry_filters_by_source() -> None:
    image, llm = set(codec.codec_names("image")), set(HIDDEN)
    assert {"raw-fp16", "raw-fp32", "analog", "uint8"} <= image & llm
    assert {"int8-token", "hadamard4", "fcm-hidden", "dtufc-hidden", "jscc-hidden", "int8-token+ol",
            "hadamard4+ol", "fcm-hidden+ol"} <= llm - image
    assert {"hyperprior", "jscc", "e2e-meg"} <= image - llm
    assert set(codec.codec_names()) == image | llm
    assert [p.name for p in list_codecs("llm-hidden")] == sorted(llm)
    assert all("llm-hidden" in p.sources for p in list_codecs("llm-hidden"))
    with pytest.raises(CodecError, match="unknown feature source"):
        codec.codec_names("audio")


@pytest.mark.parametrize("name", HIDDEN)
@pytest.mark.parametrize("rows", [1, 9])
def test_every_hidden_codec_round_trips_shape(name: str, rows: int) -> None:
    x = hidden(rows)
    c = build(name)
    p = c.encode({"hidden": x})
    y = c.decode(p)["hidden"]
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert p.bits_sent == 8 * (len(p.data) + len(p.side_info))
    # Every decoder needs nothing but the header and its own set: a fresh codec decodes the payload.
    y2 = codec.build_codec(name, dict(p.params), SET_DIR).decode(p)["hidden"]
    assert torch.equal(y, y2)


def test_raw_fp32_is_exact() -> None:
    x = hidden(5) * 1e3
    c = codec.build_codec("raw-fp32")
    p = c.encode({"hidden": x})
    assert torch.equal(c.decode(p)["hidden"], x) and p.bits_sent == 32 * x.numel()


def test_int8_token_error_within_one_step_per_row() -> None:
    x = hidden(12)
    x[0, 0] *= 50  # a row far larger than the others keeps the others' resolution (per-row scales)
    c = codec.build_codec("int8-token")
    p = c.encode({"hidden": x})
    y = c.decode(p)["hidden"]
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((y - x).abs() <= 0.5 * step * 1.01 + 1e-6).all()
    assert p.bits_sent == 8 * x.numel() + 16 * x.shape[1]  # int8 codes + one float16 scale a row


def test_hadamard_rotation_is_orthogonal_and_exactly_inverted() -> None:
    x = torch.randn(7, 128, dtype=torch.float64)
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)
    h = fwht(torch.eye(128, dtype=torch.float64)) * hadamard_signs(128, 3).double()
    assert torch.allclose(h @ h.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    stage = codec.build_codec("hadamard+fp32", {"hadamard_seed": "3"})
    for d in (128, 100):  # 100 is zero-padded to 128 and cropped back
        v = hidden(4, d)
        p = stage.encode({"hidden": v})
        assert p.params["hadamard_dims"] == str(d)
        assert torch.allclose(stage.decode(p)["hidden"], v, atol=1e-5)


def planted(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows with massive activations: dimensions 5 and 77 ×1000 in every row, and a huge first token
    (a planted value is 1000 × max(|h|, median |h|), so none is accidentally small)."""
    x = hidden(10, seed=seed)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., [5, 77]] = True
    mask[:, 0] = True
    big = torch.sign(x) * 1000 * x.abs().clamp_min(float(x.abs().median()))
    return torch.where(mask, big, x), mask


def rel_errors(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(worst relative error of the planted values, RMS error of the bulk over its RMS)."""
    planted_err = float(((y - x).abs() / x.abs().clamp_min(1e-3))[mask].max())
    bulk_err = float((y - x)[~mask].pow(2).mean().sqrt() / x[~mask].pow(2).mean().sqrt())
    return planted_err, bulk_err


@pytest.mark.parametrize("name", CLIPPING)
def test_outlier_side_channel_saves_planted_outliers(name: str) -> None:
    x, mask = planted()
    plain, protected = build(name), build(f"{name}+ol")
    p0, p1 = plain.encode({"hidden": x}), protected.encode({"hidden": x})
    lost = rel_errors(x, plain.decode(p0)["hidden"], mask)
    kept = rel_errors(x, protected.decode(p1)["hidden"], mask)
    # Without the side channel the quantiser destroys the planted values or (absmax) the rest of their rows.
    assert max(lost) > 0.5, lost
    # With it the planted values arrive to float16 precision and the bulk to the codec's normal precision.
    ref = hidden(10, seed=1)
    clean = float((plain.decode(plain.encode({"hidden": ref}))["hidden"] - ref).pow(2).mean().sqrt()
                  / ref.pow(2).mean().sqrt())
    assert kept[0] < 2e-3 and kept[1] < 1.5 * clean + 0.01, (kept, clean)


def test_outlier_side_information_is_counted() -> None:
    x, mask = planted()
    plain, protected = build("int8-token"), build("int8-token+ol")
    p0, p1 = plain.encode({"hidden": x}), protected.encode({"hidden": x})
    n_outliers = int(mask.sum())
    assert len(p1.side_info) >= 2 * n_outliers  # at least a float16 per outlier
    assert p1.bits_sent == 8 * (len(p1.data) + len(p1.side_info)) > p0.bits_sent
    # Without outliers the side channel costs nothing at all.
    clean = protected.encode({"hidden": hidden(3)})
    assert clean.side_info == b"" and clean.bits_sent == plain.encode({"hidden": hidden(3)}).bits_sent


def test_bits_per_value_of_the_fitted_codecs() -> None:
    x = hidden(20)
    rates = {n: build(n).encode({"hidden": x}).bits_sent / x.numel()
             for n in ("int8-token", "hadamard4", "fcm-hidden", "dtufc-hidden-16")}
    assert rates["int8-token"] == 8 + 16 / 128 and rates["hadamard4"] == 4 + 16 / 128
    assert rates["fcm-hidden"] < 4 and rates["dtufc-hidden-16"] < 4.5


@pytest.mark.parametrize("name", ["fcm-hidden", "dtufc-hidden", "jscc-hidden", "fcm-hidden+ol"])
def test_missing_codec_set_names_the_command(name: str, tmp_path: Path) -> None:
    for folder in (tmp_path, None):
        with pytest.raises(CodecError, match="missing.*meg train codecs --source llm-hidden"):
            codec.build_codec(name, {}, folder)


def test_tampered_or_foreign_codec_set_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "set"
    shutil.copytree(SET_DIR, copy)
    p = build("fcm-hidden").encode({"hidden": hidden(2)})
    data = bytearray((copy / "fcm.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "fcm.safetensors").write_bytes(bytes(data))
    with pytest.raises(CodecError, match="does not match"):
        codec.build_codec("fcm-hidden", {}, copy)
    other = codec.build_codec("fcm-hidden", {}, codec_set_dir(DEFAULT_LLM_DIR, 1))
    with pytest.raises(CodecError, match="same set"):
        other.decode(p)


def _mutations(p: EncodedPayload, rng: np.random.Generator) -> list[EncodedPayload]:
    out = []
    if p.kind == "digital":
        data = p.data
        out += [EncodedPayload("digital", p.tensors, p.params, data=d) for d in (
            b"", data[: len(data) // 2], data + b"\x00\x07", bytes(rng.integers(0, 256, len(data), dtype=np.uint8)),
            bytes(b ^ 0xFF if i % 7 == 0 else b for i, b in enumerate(data)))]
    else:
        out += [EncodedPayload("analog", p.tensors, p.params, symbols=s) for s in (
            p.symbols[:-1], np.full_like(p.symbols, np.nan), p.symbols * 1e30)]
    for key, value in (("side_info", "!!!!"), ("side_info", "AAAAAAAA"), ("coded_tensors", "hidden:1x3x7"),
                       ("hadamard_dims", "5"), ("llm_set", "x"), ("q_bits", "99"), ("fcm_bits", "7"),
                       ("dtufc_k", "3"), ("jscc_snr_db", "nan")):
        out.append(EncodedPayload(p.kind, p.tensors, {**p.params, key: value}, data=p.data, symbols=p.symbols))
    return out


@pytest.mark.parametrize("name", HIDDEN)
def test_malformed_payloads_raise_codec_error(name: str) -> None:
    rng = np.random.default_rng(0)
    x = hidden(4)
    x[0, 1, 3] = 5000.0  # so the +ol presets carry side information to damage
    payload = build(name).encode({"hidden": x})
    for bad in _mutations(payload, rng):
        try:
            built = codec.build_codec(name, dict(bad.params), SET_DIR)
            out = built.decode(bad)["hidden"]
        except CodecError:
            continue
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_fit_writes_a_loadable_set(tmp_path: Path) -> None:
    from codec.fit_hidden import fit_llm_codec_set

    out = fit_llm_codec_set(DEFAULT_LLM_DIR, 1, tmp_path / "set", n_docs=12, jscc_steps=3)
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["source"] == "llm-hidden" and config["split_layer"] == 1 and len(config["content_hash"]) == 64
    assert config["model_id"].startswith("shapes_llm_v1@sha256:")
    for name in ("fcm-hidden", "dtufc-hidden-16", "jscc-hidden"):
        c = codec.build_codec(name, {"channel_snr_db": "5"}, out)
        x = hidden(3)
        assert c.decode(c.encode({"hidden": x}))["hidden"].shape == x.shape


def test_bench_parts_return_rows() -> None:
    """bench.llm_rate's functions, at the smallest size: the rows bench/llm.py builds on."""
    from bench.llm_rate import run_outliers, run_rate, run_snr

    rate = run_rate(split_layers=(2,), codecs=("int8-token", "fcm-hidden+ol", "jscc-hidden"), n_prompts=2)
    by_codec = {r["codec"]: r for r in rate}
    assert set(by_codec) == {"uncoded", "int8-token", "fcm-hidden+ol", "jscc-hidden"}
    assert by_codec["int8-token"]["bits_per_value"] == 8 + 16 / 128
    assert by_codec["jscc-hidden"]["symbols_per_value"] == 0.25
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 for r in rate)
    snr = run_snr(codecs=("hadamard4", "analog"), snrs_db=(20.0,), channels=("awgn",), n_prompts=1)
    assert [r["codec"] for r in snr] == ["hadamard4", "analog"] and snr[0]["transport"] == "ldpc-qpsk-1/2"
    outliers = {r["codec"]: r for r in run_outliers(codecs=("fcm-hidden",))}
    assert outliers["fcm-hidden"]["planted_median_rel_error"] > 0.5
    assert outliers["fcm-hidden+ol"]["planted_max_rel_error"] < 2e-3 and outliers["fcm-hidden+ol"]["side_bits"] > 0

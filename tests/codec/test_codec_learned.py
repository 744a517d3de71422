"""Learned CompressAI coders: real bitstreams, consistency, golden bytes, rate accounting, robustness."""

from __future__ import annotations

import hashlib
import random
import zlib

import pytest
import torch

import codec  # noqa: F401  (registers stages, terminals and presets)
from codec.base import CodecError, EncodedPayload, StageContext, TensorInfo
from codec.learned import (DOMAINS, MODEL_KINDS, CoderConfig, LearnedCoder, build_model, decode_planes, encode_planes,
                           load_coder, reference_reconstruction)
from codec.registry import build_codec, codec_names
from codec.image_sets import image_set_dir
from codec.train_coders import default_pairs
from models import DEFAULT_MODEL_DIR

#: The embedded model's image codec set (committed), which every learned coder here loads from.
SET = image_set_dir(DEFAULT_MODEL_DIR)

PRESETS = ["factorized", "hyperprior", "mshyperprior", "elic", "gained", "fcm+gained", "dtufc+gained",
           "dtufc-clip+gained", "dtufc-pwl+gained"]


def _latents(seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((batch, 4, 16, 16), generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.7


def test_presets_registered() -> None:
    assert set(PRESETS) <= set(codec_names())


@pytest.mark.parametrize("kind,domain", default_pairs() + [("gained", d) for d in DOMAINS])
def test_decompress_equals_models_own_quantised_reconstruction(kind: str, domain: str) -> None:
    model, _ = load_coder("shapes_v1", kind, domain, 2, SET)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((1, 1, 32, 32), generator=g) if domain != "identity" else torch.randn((1, 1, 32, 32), generator=g)
    strings = encode_planes(model, kind, x)
    decoded = decode_planes(model, kind, strings, tuple(x.shape))
    ref = reference_reconstruction(model, x)
    assert decoded.shape == x.shape
    assert torch.allclose(decoded, ref, atol=1e-4), float((decoded - ref).abs().max())


@pytest.mark.parametrize("preset", PRESETS)
def test_codec_round_trip_and_bpfp(preset: str) -> None:
    c = build_codec(preset, None, SET)
    x = {"latents": _latents(2)}
    payload = c.encode(x)
    assert payload.kind == "digital" and len(payload.data) > 5
    bpfp = payload.bits_sent / x["latents"].numel()
    assert payload.bits_sent == 8 * len(payload.data) and bpfp == len(payload.data) * 8 / (4 * 16 * 16)
    out = c.decode(payload)["latents"]
    assert out.shape == x["latents"].shape and torch.isfinite(out).all()
    # Decoding is deterministic and what the encoder would reconstruct.
    assert torch.equal(out, c.decode(payload)["latents"])


def test_quality_ladder_orders_rate() -> None:
    x = {"latents": _latents(3, batch=4)}
    for preset in ("hyperprior", "dtufc+gained", "dtufc-pwl+gained"):
        sizes = [len(build_codec(preset, {"learned_quality": str(q)}, SET).encode(x).data) for q in (1, 2, 3, 4)]
        assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (preset, sizes)


def test_golden_bitstream() -> None:
    """Fixed seed-initialised coder + fixed input -> fixed bytes (CompressAI-style regression test).

    Independent of the trained weights, so it pins the architecture, the entropy coder and the CDF
    construction: if it changes, edge and device builds would no longer agree on bitstreams.
    """
    torch.manual_seed(0)
    model = build_model(CoderConfig("hyperprior")).eval()
    model.update(force=True)
    x = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32) ** 2
    blob = b"".join(s for group in encode_planes(model, "hyperprior", x) for s in group)
    assert hashlib.sha256(blob).hexdigest()[:16] == GOLDEN_HYPERPRIOR, hashlib.sha256(blob).hexdigest()[:16]


GOLDEN_HYPERPRIOR = "3cf3b89029da493e"


def _with_crc(body: bytes) -> bytes:
    return body + zlib.crc32(body).to_bytes(4, "little")


@pytest.mark.parametrize("preset", ["dtufc+gained", "elic", "mshyperprior", "factorized"])
def test_corrupt_and_truncated_payloads_raise_codec_error(preset: str) -> None:
    c = build_codec(preset, None, SET)
    payload = c.encode({"latents": _latents(4)})
    data = payload.data
    rng = random.Random(0)

    def decode(blob: bytes) -> None:
        bad = EncodedPayload(payload.kind, payload.tensors, dict(payload.params), data=blob)
        try:
            out = c.decode(bad)["latents"]
        except CodecError:
            return
        assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()

    for cut in range(len(data)):  # every truncation
        with pytest.raises(CodecError):
            c.decode(EncodedPayload(payload.kind, payload.tensors, dict(payload.params), data=data[:cut]))
    for _ in range(200):  # random byte corruption: the CRC must catch it
        blob = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] ^= rng.randint(1, 255)
        with pytest.raises(CodecError):
            c.decode(EncodedPayload(payload.kind, payload.tensors, dict(payload.params), data=bytes(blob)))
    body = data[:-4]
    for _ in range(25 if "elic" in preset else 60):  # forged payloads with a valid CRC reach the rANS decoder: never crash or hang
        blob = bytearray(body)
        mode = rng.randrange(4)
        if mode == 0:
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(1, len(blob))] = rng.randrange(256)
        elif mode == 1:
            blob = blob[:rng.randrange(1, len(blob))]
        elif mode == 2:
            blob = blob[:1] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3 * len(blob))))
        else:
            blob += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        decode(_with_crc(bytes(blob)))
    for garbage in (b"", b"\x01", b"\x00" * 4, _with_crc(b"\x02"), _with_crc(b"\x01" + b"\xff" * 12)):
        with pytest.raises(CodecError):
            c.decode(EncodedPayload(payload.kind, payload.tensors, dict(payload.params), data=garbage))


@pytest.mark.parametrize("params", [
    {"learned_model": "jpeg"}, {"learned_quality": "abc"}, {"learned_quality": "0"}, {"learned_quality": "99"},
    {"learned_quality": "9"}, {"learned_domain": "zscore"}, {"learned_set": "../weights/learned_shapes_v1"},
    {"learned_set": "nope"}, {"learned_model": "elic", "learned_domain": "fcm"},
])
def test_garbage_params_raise_codec_error(params: dict[str, str]) -> None:
    with pytest.raises(CodecError):
        build_codec("dtufc+gained", params, SET)


def test_garbage_header_on_decode_raises_codec_error() -> None:
    c = build_codec("dtufc+gained", None, SET)
    payload = c.encode({"latents": _latents(5)})
    for key, value in [("coded_tensors", "latents:1x1x32"), ("coded_tensors", "latents:1x3x32x32"),
                       ("coded_tensors", "latents:1x1x64x64"), ("coded_tensors", "zz"),
                       ("tile_shapes", "latents:1x4x8x8"), ("tile_shapes", "other:1x4x16x16"),
                       ("coded_tensors", "latents:100000x1x4096x4096")]:
        params = {**payload.params, key: value}
        with pytest.raises(CodecError):
            c.decode(EncodedPayload("digital", payload.tensors, params, data=payload.data))


def test_learned_coder_rejects_unpacked_tensors() -> None:
    coder = LearnedCoder({"learned_model": "hyperprior"}, SET)
    with pytest.raises(CodecError):
        coder.compress({"latents": _latents(6)}, StageContext(params={}))
    with pytest.raises(CodecError):
        coder.decompress(b"\x01" * 9, [TensorInfo("latents", (1, 4, 16, 16))], StageContext(params={}))


def test_all_model_kinds_trained() -> None:
    for kind in MODEL_KINDS:
        for q in (1, 2, 3, 4):
            load_coder("shapes_v1", kind, "identity", q, SET)
    for domain in DOMAINS:  # the variable-rate coder behind every transform
        for q in (1, 2, 3, 4):
            load_coder("shapes_v1", "gained", domain, q, SET)

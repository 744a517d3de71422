"""The image codec set beside the model (``<model dir>/codecs/image-k0``): its config, the old-layout error, the
edge naming its set in the header, the device refusing another set's payload, REST, and the fitting CLI."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

import codec
from codec.base import CodecError
from codec.image_sets import image_set_dir, require_image_set, set_files
from codec.registry import uses_codec_set
from codec.sets import IMAGE_SOURCE, LLM_SOURCE, content_hash, file_sha256
from device_client.generate import CodecSetMismatchError, ImageGeneration
from edge_server.service import EdgeApi, EdgeResult
from meg.v1 import meg_pb2
from models import DEFAULT_MODEL_DIR
from serving.contract import CallContext, RequestError, Status
from telemetry.metrics import MegMetrics
from wire import framing
from wire.framing import ReceivedStream

from tiny_models import build_tiny_ldm

SET = image_set_dir(DEFAULT_MODEL_DIR)


def _fake_model(root: Path) -> Path:
    """A model folder as far as sets care: a vae/config.json (adopting hashes the weights there, none here)."""
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text("{}")
    return root


def test_committed_set_is_beside_the_model_and_hashes_its_files() -> None:
    config = json.loads((SET / "config.json").read_text())
    assert SET == DEFAULT_MODEL_DIR / "codecs" / "image-k0"
    assert config["source"] == IMAGE_SOURCE and config["split"] == 0 and config["set_name"] == "shapes_v1"
    assert config["model_id"].startswith("shapes_v1@sha256:")
    assert config["made_by"]["method"] == "adopted"  # moved from codec/weights, not retrained
    assert config["files"] == {p.name: file_sha256(p) for p in set_files(SET)}
    assert config["content_hash"] == content_hash(config["files"])
    assert not (Path(codec.__file__).resolve().parent / "weights").exists()  # no global layout any more
    assert require_image_set(SET).set_name == "shapes_v1"


def test_old_layout_folder_fails_saying_how_to_convert(tmp_path: Path) -> None:
    old = tmp_path / "weights"
    old.mkdir()
    for p in set_files(SET):
        shutil.copy2(p, old / p.name)
    with pytest.raises(CodecError, match=r"old global codec/weights layout.*meg train codecs --source image "
                                         r"--model-dir .* --adopt"):
        codec.build_codec("dtufc+gained", {}, old)
    model = _fake_model(tmp_path / "model")
    from models.train import main

    assert main(["codecs", "--source", "image", "--model-dir", str(model), "--adopt", str(old)]) == 0
    adopted = image_set_dir(model)
    config = json.loads((adopted / "config.json").read_text())
    assert config["made_by"]["method"] == "adopted" and config["content_hash"] == \
        json.loads((SET / "config.json").read_text())["content_hash"]  # same files: the same set
    x = {"latents": torch.randn(1, 4, 16, 16)}
    c = codec.build_codec("dtufc+gained", {}, adopted)
    assert c.decode(c.encode(x))["latents"].shape == x["latents"].shape


def test_a_model_without_a_set_serves_only_codecs_without_fitted_data(tmp_path: Path) -> None:
    folder = image_set_dir(tmp_path / "sd15")
    for name in ("raw-fp16", "raw-fp32", "uint8", "analog"):
        assert not uses_codec_set(name)
        codec.build_codec(name, {}, folder)
    for name in ("hyperprior", "fcm+gained", "jscc", "e2e-meg"):
        assert uses_codec_set(name)
        with pytest.raises(CodecError, match=r"meg train codecs --source image --model-dir .*sd15"):
            codec.build_codec(name, {"channel_snr_db": "10"}, folder)


def test_a_tampered_file_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "codecs" / "image-k0"
    shutil.copytree(SET, copy)
    data = json.loads((copy / "fcm_shapes_v1.json").read_text())
    (copy / "fcm_shapes_v1.json").write_text(json.dumps({**data, "hi": data["hi"] + 1}))
    with pytest.raises(CodecError, match="does not match"):
        codec.build_codec("fcm+gained", {}, copy)


# ---------------------------------------------------------------------------------------- edge and device


def _edge(model_dir: Path) -> EdgeApi:
    backend = SimpleNamespace(path=model_dir, model_id=model_dir.name, vae_scale_factor=4,
                              latent_shape=lambda h, w: (4, 16, 16))
    return EdgeApi(backend, SimpleNamespace(cpu_threads=1), MegMetrics("edge"))  # type: ignore[arg-type]


def _edge_stream(api: EdgeApi, codec_name: str) -> list[meg_pb2.GenerateResponse]:
    request = meg_pb2.GenerateRequest(prompt="a red circle", steps=2, codec=codec_name)
    ctx = CallContext("req-1")
    work = asyncio.run(api.decode_request(request, ctx))
    features = {"latents": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))}
    completion = SimpleNamespace(queue_s=0.0, admit_s=0.0, run_s=0.0, mean_batch=1.0, steps=2)
    result = EdgeResult(work, completion, features, work.codec.encode(features), 0.0)  # type: ignore[arg-type]

    async def collect() -> list[meg_pb2.GenerateResponse]:
        return [frame async for frame in api.encode_response(result, ctx)]

    try:
        return asyncio.run(collect())
    finally:
        api.close()


def _received(frames: list[meg_pb2.GenerateResponse]) -> ReceivedStream:
    assembler = framing.StreamAssembler()
    for frame in frames:
        assembler.add(frame)
    return assembler.finish()


def test_edge_header_names_its_codec_set() -> None:
    frames = _edge_stream(_edge(DEFAULT_MODEL_DIR), "hyperprior")
    header = frames[0].header
    config = json.loads((SET / "config.json").read_text())
    assert header.codec_set == "shapes_v1/image-k0"
    assert header.codec_set_hash == config["content_hash"]


def test_edge_without_a_set_refuses_fitted_codecs_with_the_command(tmp_path: Path) -> None:
    api = _edge(tmp_path / "no_set_model")
    with pytest.raises(RequestError) as info:
        asyncio.run(api.decode_request(meg_pb2.GenerateRequest(prompt="x", steps=2, codec="hyperprior"),
                                       CallContext("r")))
    assert info.value.status is Status.INVALID and "meg train codecs --source image" in info.value.message
    header = _edge_stream(api, "raw-fp16")[0].header  # codecs without fitted data still work
    assert header.codec_set == "no_set_model/image-k0" and header.codec_set_hash == ""


class _Link:
    """A DeviceLink that hands back a prepared stream."""

    def __init__(self, received: ReceivedStream) -> None:
        self.received = received

    async def generate(self, request: meg_pb2.GenerateRequest, timeout_s: float) -> ReceivedStream:
        return self.received


def _device(model_dir: Path, received: ReceivedStream) -> ImageGeneration:
    decoder = SimpleNamespace(decode=lambda latents: torch.zeros(latents.shape[0], 3, 64, 64))
    decoders = SimpleNamespace(model_dir=model_dir, get=lambda kind: decoder)
    return ImageGeneration(_Link(received), decoders, None, None, None, model_dir=model_dir)  # type: ignore[arg-type]


def test_device_refuses_a_payload_of_another_set_with_a_clean_502(tmp_path: Path) -> None:
    other = tmp_path / "other_model"
    shutil.copytree(SET, image_set_dir(other))
    config = json.loads((image_set_dir(other) / "config.json").read_text())
    config["content_hash"] = "f" * 64  # a set with other content (its own files are what it says here)
    (image_set_dir(other) / "config.json").write_text(json.dumps(config))
    received = _received(_edge_stream(_edge(DEFAULT_MODEL_DIR), "hyperprior"))
    device = _device(other, received)
    spec = SimpleNamespace(noiseless=True)
    with pytest.raises(CodecSetMismatchError, match="shapes_v1/image-k0.*other_model/image-k0"):
        device._decode(received, spec, "tiny_decoder")  # type: ignore[arg-type]
    work = SimpleNamespace(request=meg_pb2.GenerateRequest(), spec=spec, decoder="tiny_decoder")
    device.defaults = SimpleNamespace(request_timeout_s=5.0)  # type: ignore[assignment]
    with pytest.raises(RequestError) as info:
        asyncio.run(device.run(work, CallContext("r")))  # type: ignore[arg-type]
    assert info.value.status.http_status == 502 and info.value.label == "codec_set_mismatch"
    assert "codec set mismatch" in info.value.message
    # The same set decodes; a codec without fitted data decodes whatever the sets.
    _device(DEFAULT_MODEL_DIR, received)._decode(received, spec, "tiny_decoder")  # type: ignore[arg-type]
    raw = _received(_edge_stream(_edge(DEFAULT_MODEL_DIR), "raw-fp16"))
    _device(other, raw)._decode(raw, spec, "tiny_decoder")  # type: ignore[arg-type]


def test_rest_sources_and_codecs_name_the_device_sets() -> None:
    from device_client.app import DeviceConfig, create_app

    app = create_app(DeviceConfig())

    async def get(path: str) -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://device") as client:
            response = await client.get(path)
            assert response.status_code == 200, response.text
            return response.json()

    image_hash = json.loads((SET / "config.json").read_text())["content_hash"]
    sources = {s["name"]: s for s in asyncio.run(get("/v1/sources"))["sources"]}
    assert sources[IMAGE_SOURCE]["codec_set"] == {"id": "shapes_v1/image-k0", "hash": image_hash, "split": 0}
    assert sources[LLM_SOURCE]["codec_set"]["id"].endswith(f"/llm-hidden-k{sources[LLM_SOURCE]['codec_set']['split']}")
    assert asyncio.run(get("/v1/codecs?source=image"))["codec_set"]["hash"] == image_hash


# ------------------------------------------------------------------------------------------- fitting


def test_meg_train_codecs_image_smoke_on_a_tiny_model(tmp_path: Path) -> None:
    """Seconds: 6 + 2 sampler latents of 2 steps, two coders of 2 steps, JSCC links of 3 steps."""
    from models.train import main

    model = build_tiny_ldm(tmp_path / "tiny")
    argv = ["codecs", "--source", "image", "--model-dir", str(model), "--latents", "6", "--test-latents", "2",
            "--sampling-steps", "2", "--sample-batch", "4", "--pairs", "factorized:identity,hyperprior:identity",
            "--gained-domains", "fcm,dtufc-pwl", "--gained-steps", "4", "--native-steps", "4", "--coder-steps", "2", "--coder-batch", "2", "--jobs", "1", "--jscc-latent-steps", "2",
            "--jscc-steps", "1", "--work-dir", str(tmp_path / "work")]
    assert main(argv) == 0
    folder = image_set_dir(model)
    config = json.loads((folder / "config.json").read_text())
    assert config["source"] == IMAGE_SOURCE and config["set_name"] == "tiny"
    assert set(config["made_by"]["parts"]) == {"fcm+dtufc", "learned", "gained", "jscc_full", "jscc_e2e",
                                               "jscc_e2e_fixed", "jscc_e2e_learned"}
    assert "sampler final latents" in config["made_by"]["parts"]["learned"]["features"]
    assert set(config["made_by"]["parts"]["learned"]["rate_monotonic"]) == {"factorized.identity", "hyperprior.identity"}
    assert set(config["made_by"]["parts"]["gained"]["rate_monotonic"]) == {"gained.fcm", "gained.dtufc-pwl",
                                                                            "gained-native.identity"}
    latents = torch.load(tmp_path / "work" / "latents.pt")
    assert latents.shape == (8, 4, 8, 8)  # the backend's final latents, the shape the edge sends
    x = {"latents": latents[:1]}
    for name in ("factorized", "hyperprior", "fcm+gained", "dtufc-pwl+gained", "gained-native", "jscc", "e2e-meg",
                 "e2e-meg-fixed", "e2e-meg-learned"):
        c = codec.build_codec(name, {"channel_snr_db": "10"}, folder)
        assert c.decode(c.encode(x))["latents"].shape == x["latents"].shape
    # Resumable: a second run finds every part and leaves the set as it is.
    before = (folder / "config.json").read_bytes()
    assert main(argv) == 0
    assert (folder / "config.json").read_bytes() == before


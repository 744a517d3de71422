"""The device client: a FastAPI app that takes prompts over REST, receives features from the edge through
the channel emulator, decodes them with its lightweight decoder and serves the images."""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import codec
from channel_sim.channels import list_channels
from codec.base import CodecError
from device_client.decoders import DecoderBank, DecoderUnavailableError
from device_client.finisher import SplitFinisher
from device_client.link import DeviceLink, DeviceLinkConfig, LinkError
from device_client.quality import ms_ssim_score, psnr_db
from device_client.schemas import GenerateIn, GenerateOut, Timings
from meg.v1 import meg_pb2
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "shapes_v1"


@dataclass
class DeviceConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address the REST API binds"})
    port: int = field(default=8000, metadata={"help": "REST port"})
    channel: str = field(default="127.0.0.1:50052", metadata={"help": "channel emulator address host:port"})
    model_dir: Path = field(default_factory=default_model_dir, metadata={
        "help": "model folder with the decoders (default: the embedded models/shapes_v1)"})
    device: str = field(default="cpu", metadata={"help": "torch device of the decoders, e.g. cpu or cuda"})
    request_timeout_s: float = field(default=120.0, metadata={"help": "deadline of one request upstream (s)"})
    max_in_flight: int = field(default=64, metadata={"help": "requests in flight beyond which new ones get 503"})
    max_images: int = field(default=512, metadata={"help": "generated images kept for GET /v1/images"})
    max_body_bytes: int = field(default=64 * 1024, metadata={"help": "largest REST request body (bytes)"})
    default_steps: int = field(default=20, metadata={"help": "denoising steps of a request that sets none"})
    default_guidance: float = field(default=4.0, metadata={"help": "guidance scale of a request that sets none"})
    default_codec: str = field(default="raw-fp16", metadata={"help": "codec of a request that names none"})
    api_keys: tuple[str, ...] = field(default=(), metadata={"help": "REST API keys (from MEG_API_KEY only)"})
    tls_dir: Path | None = field(default=None, metadata={
        "help": "mutual TLS towards the channel emulator (certificates from `meg certs`)"})

    @staticmethod
    def keys_from_env() -> tuple[str, ...]:
        raw = os.environ.get("MEG_API_KEY", "")
        return tuple(k.strip() for k in raw.split(",") if k.strip())


class ImageStore:
    """The last ``capacity`` PNGs in memory, by id (oldest evicted first)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def put(self, image_id: str, png: bytes) -> None:
        self._items[image_id] = png
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, image_id: str) -> bytes | None:
        return self._items.get(image_id)


def to_png(image: torch.Tensor) -> bytes:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _error(status: int, detail: str, retry_after: str | None = None) -> JSONResponse:
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class DeviceState:
    """Everything the app holds: link, decoders, images, history and metrics."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.metrics = MegMetrics("device")
        self.link: DeviceLink | None = None
        self.decoders = DecoderBank(config.model_dir, config.device)
        self.finisher = SplitFinisher(config.model_dir, config.device)
        self.images = ImageStore(config.max_images)
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=200)
        self.in_flight = 0


def create_app(config: DeviceConfig) -> FastAPI:
    state = DeviceState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        credentials = None
        if config.tls_dir is not None:
            from security.tls import channel_credentials

            credentials = channel_credentials(config.tls_dir, "device")
        state.link = DeviceLink(DeviceLinkConfig(config.channel), credentials)
        # Load the decoders before the first request, so its latency is not a cold start.
        for kind in state.decoders.available():
            await asyncio.to_thread(state.decoders.get, kind)
        yield
        await state.link.close()

    app = FastAPI(title="MEG device client", version="1.0",
                  description="Prompts in, images out: features cross a simulated wireless link from the edge.",
                  lifespan=lifespan)
    app.state.meg = state

    def require_key(request: Request) -> None:
        if not config.api_keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(token, k) for k in config.api_keys):
            raise HTTPException(401, "missing or invalid API key: send Authorization: Bearer <key>",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
                  for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_body_bytes:
            return _error(413, f"request body over {config.max_body_bytes} bytes")
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        index = STATIC_DIR / "index.html"
        if not index.is_file():
            return JSONResponse({"detail": "dashboard not installed; see /docs for the API"}, status_code=404)
        return FileResponse(index, media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        # Only plain file names from the package's own static folder: no user-controlled paths.
        allowed = {p.name: p for p in STATIC_DIR.glob("*") if p.is_file()} if STATIC_DIR.is_dir() else {}
        if name not in allowed:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(allowed[name])

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        assert state.link is not None
        ok, reason = await state.link.health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason},
                            status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/codecs", dependencies=[Depends(require_key)])
    async def codecs() -> dict[str, Any]:
        from codec.registry import codec_kind, resolve_spec

        items = []
        for preset in codec.list_codecs():
            items.append({"name": preset.name, "description": preset.description, "kind": codec_kind(preset.name),
                          "stages": resolve_spec(preset.name)[0].split("+"), "params": preset.params})
        return {"codecs": items, "default": config.default_codec}

    @app.get("/v1/channels", dependencies=[Depends(require_key)])
    async def channels() -> dict[str, Any]:
        return {"channels": [{"name": c.name, "description": c.description, "parameters": list(c.parameters)}
                             for c in list_channels()]}

    @app.get("/v1/history", dependencies=[Depends(require_key)])
    async def history() -> dict[str, Any]:
        return {"requests": list(state.history)}

    @app.get("/v1/images/{name}", dependencies=[Depends(require_key)])
    async def image(name: str) -> Response:
        image_id = name.removesuffix(".png")
        png = state.images.get(image_id) if name.endswith(".png") else None
        if png is None:
            raise HTTPException(404, f"no image {name!r} (images are kept for the last {config.max_images} requests)")
        return Response(png, media_type="image/png")

    @app.post("/v1/generate", response_model=GenerateOut, dependencies=[Depends(require_key)])
    async def generate(body: GenerateIn, request: Request) -> Response:
        if state.in_flight >= config.max_in_flight:
            state.metrics.error("device_overloaded")
            return _error(503, f"device has {state.in_flight} requests in flight (limit {config.max_in_flight})",
                          retry_after="1")
        request_id = uuid.uuid4().hex[:16]
        token = set_request_id(request_id)
        state.in_flight += 1
        state.metrics.in_flight.labels("device").set(state.in_flight)
        try:
            return await _generate(state, body, request, request_id)
        finally:
            state.in_flight -= 1
            state.metrics.in_flight.labels("device").set(state.in_flight)
            reset_request_id(token)

    return app


def _grpc_request(config: DeviceConfig, body: GenerateIn, request_id: str) -> meg_pb2.GenerateRequest:
    ch = body.channel
    spec = meg_pb2.ChannelSpec(model=ch.model, modulation=ch.modulation or "", fec=ch.fec or "")
    for name in ("snr_db", "bandwidth_hz", "delay_ms", "k_factor", "coherence_symbols", "seed", "code_rate"):
        value = getattr(ch, name)
        if value is not None:
            setattr(spec, name, value)
    return meg_pb2.GenerateRequest(
        request_id=request_id, prompt=body.prompt,
        seed=body.seed if body.seed is not None else int.from_bytes(os.urandom(4), "little"),
        steps=body.steps or config.default_steps,
        guidance_scale=body.guidance_scale if body.guidance_scale is not None else config.default_guidance,
        codec=body.codec or config.default_codec, codec_params=body.codec_params, channel=spec,
        split_step=body.split_step, reference=body.reference, height=body.height or 0, width=body.width or 0)


async def _generate(state: DeviceState, body: GenerateIn, request: Request, request_id: str) -> Response:
    config = state.config
    assert state.link is not None
    started = time.perf_counter()
    req = _grpc_request(config, body, request_id)
    if req.split_step and req.split_step >= req.steps:
        return _error(422, f"split_step: must be below steps ({req.steps}), got {req.split_step}")
    noisy = req.channel.model != "ideal"
    snr = req.channel.snr_db if req.channel.HasField("snr_db") else (10.0 if noisy else None)
    labels = state.metrics.labels("-", req.codec, req.channel.model, snr)
    try:
        decoder_kind = state.decoders.resolve(body.decoder, noisy)
    except DecoderUnavailableError as exc:
        return _error(422, f"decoder: {exc}")

    # The REST client may go away mid-request: watch for it and cancel the call upstream (edge work stops).
    call = asyncio.ensure_future(state.link.generate(req, config.request_timeout_s))
    while not call.done():
        done, _ = await asyncio.wait({call}, timeout=0.25)
        if not done and await request.is_disconnected():
            call.cancel()
            state.metrics.error("client_disconnected")
            log.info("client disconnected; cancelled upstream work")
            return _error(499, "client disconnected")
    try:
        received = call.result()
    except LinkError as exc:
        state.metrics.error(exc.kind)
        state.metrics.requests.labels("device", req.codec, req.channel.model, exc.kind).inc()
        log.warning("request failed (%d): %s", exc.http_status, exc.reason)
        return _error(exc.http_status, exc.reason, exc.retry_after_s)
    labels["model"] = received.header.model_id

    t_dec = time.perf_counter()
    try:
        image, reference_image, concealed = await asyncio.to_thread(
            _decode, state, received, decoder_kind)
    except (DecoderUnavailableError, ValueError) as exc:
        state.metrics.error("decode_failed")
        return _error(502, f"device could not decode the features: {exc}")
    decode_s = time.perf_counter() - t_dec

    image_id = uuid.uuid4().hex
    state.images.put(image_id, await asyncio.to_thread(to_png, image[0]))
    quality: dict[str, float] = {}
    if reference_image is not None:
        quality = {"psnr_db": psnr_db(image, reference_image), "ms_ssim": ms_ssim_score(image, reference_image)}
        state.metrics.image_psnr_db.labels(**labels).observe(quality["psnr_db"])
        state.metrics.image_ms_ssim.labels(**labels).observe(quality["ms_ssim"])
    h, report = received.header, received.trailer.channel
    total_s = time.perf_counter() - started
    edge_ms = h.timings.queue_ms + h.timings.text_encode_ms + h.timings.denoise_ms
    out = GenerateOut(
        id=image_id, image_url=f"/v1/images/{image_id}.png", width=int(image.shape[-1]), height=int(image.shape[-2]),
        codec=h.codec_id, channel=_channel_echo(report, req.channel), bits_sent=received.payload.bits_sent,
        symbols_sent=int(report.symbols), airtime_ms=report.airtime_ms,
        timings_ms=Timings(edge=edge_ms, encode=h.timings.encode_ms, channel=report.channel_ms,
                           decode=1e3 * decode_s, total=1e3 * total_s),
        quality=quality, model=h.model_id, decoder=decoder_kind, bit_errors=int(report.bit_errors),
        concealed=concealed, batch_size=h.timings.batch_size, prompt=req.prompt, seed=req.seed, steps=req.steps,
        guidance_scale=req.guidance_scale)
    state.metrics.observe_stage(labels, "decode", decode_s)
    state.metrics.observe_stage(labels, "end_to_end", total_s)
    state.metrics.request_bits.labels(**labels).observe(out.bits_sent)
    state.metrics.request_symbols.labels(**labels).observe(out.symbols_sent)
    state.metrics.requests.labels("device", req.codec, req.channel.model, "ok").inc()
    state.history.append({**out.model_dump(), "snr_db": snr})
    log.info("%s over %s: %d bits, %d symbols, %.1f ms", out.codec, req.channel.model, out.bits_sent,
             out.symbols_sent, out.timings_ms.total)
    return JSONResponse(out.model_dump())


def _channel_echo(report: meg_pb2.ChannelReport, spec: meg_pb2.ChannelSpec) -> dict[str, object]:
    echo: dict[str, object] = {"model": report.model or spec.model, "bandwidth_hz": report.bandwidth_hz,
                               "delay_ms": report.delay_ms, "modulation": report.modulation}
    if report.model and report.model != "ideal":
        echo["snr_db"] = report.snr_db
    if spec.model == "rician":
        echo["k_factor"] = spec.k_factor if spec.HasField("k_factor") else None
    if spec.fec:
        echo["fec"] = spec.fec
    return echo


def _decode(state: DeviceState, received: Any, decoder_kind: str) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Features → image (and the clean reference image when the edge sent reference features)."""
    header = received.header
    concealed = False
    try:
        feature_codec = codec.build_codec(header.codec_id, dict(header.codec_params),
                                          Path(codec.__file__).resolve().parent / "weights")
        tensors = feature_codec.decode(received.payload)
    except CodecError as exc:
        if received.trailer.channel.bit_errors == 0:
            raise ValueError(f"payload does not decode: {exc}") from exc
        # Bits flipped on the air broke the bitstream: conceal the erasure (mid-grey latent) rather than fail.
        log.warning("payload lost to channel errors (%s); concealing", exc)
        tensors = {info.name: torch.zeros(info.shape) for info in received.payload.tensors}
        concealed = True
    decoder = state.decoders.get(decoder_kind)

    def to_image(features: dict[str, torch.Tensor]) -> torch.Tensor:
        if "noisy_latents" in features:
            latents = state.finisher.finish(features["noisy_latents"], header.prompt, header.split_step,
                                            header.total_steps, header.guidance_scale)
        else:
            latents = features["latents"]
        # Channel noise can push latents far outside the decoder's range; clip to what a VAE ever emits.
        return decoder.decode(latents.clamp(-50.0, 50.0))

    image = to_image(tensors)
    reference = to_image(received.reference) if received.reference else None
    return image, reference, concealed

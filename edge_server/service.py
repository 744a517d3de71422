"""The edge gRPC service: validates a request, queues it for batched denoising, encodes the latents with
the requested codec and streams header, chunks, optional reference and trailer (``meg.v1``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

import codec
from codec import wire
from codec.base import CodecError
from edge_server.backends import TextToImageBackend, load_backend
from edge_server.engine import BatchingEngine, EngineConfig, EngineStoppedError, Job, QueueFullError
from meg.v1 import meg_pb2, meg_pb2_grpc
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = "meg.v1.EdgeGeneration"
MAX_PROMPT_CHARS = 500
MAX_STEPS = 200
MAX_REQUEST_BYTES = 64 * 1024
MAX_GUIDANCE = 50.0


def default_model_dir() -> Path:
    """The embedded default model family, committed with the project."""
    return Path(__file__).resolve().parent.parent / "models" / "shapes_v1"


@dataclass
class EdgeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address the gRPC server binds"})
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9101, metadata={"help": "Prometheus metrics port (0 disables)"})
    model_dir: Path = field(default_factory=default_model_dir,
                            metadata={"help": "diffusers model folder (default: the embedded models/shapes_v1)"})
    device: str = field(default="cpu", metadata={"help": "torch device of the model, e.g. cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "compute dtype: float32, float16 or bfloat16"})
    engine: EngineConfig = field(default_factory=EngineConfig)
    grace_s: float = field(default=10.0, metadata={"help": "seconds to drain requests in flight on shutdown"})

    def torch_dtype(self) -> torch.dtype:
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}") from None


#: Channel models the metrics label by name (the channel emulator validates the model itself).
CHANNEL_LABELS = frozenset({"ideal", "awgn", "rayleigh", "rician"})


def validate_request(request: meg_pb2.GenerateRequest) -> str | None:
    """The first problem with ``request`` (naming the field), or None."""
    if not request.prompt.strip():
        return "prompt: must not be empty"
    if len(request.prompt) > MAX_PROMPT_CHARS:
        return f"prompt: longer than {MAX_PROMPT_CHARS} characters"
    if not 1 <= request.steps <= MAX_STEPS:
        return f"steps: must be in [1, {MAX_STEPS}], got {request.steps}"
    if not 0.0 <= request.guidance_scale <= MAX_GUIDANCE:
        return f"guidance_scale: must be in [0, {MAX_GUIDANCE}], got {request.guidance_scale}"
    if not 0 <= request.split_step < request.steps:
        return f"split_step: must be in [0, steps-1], got {request.split_step}"
    if request.codec not in codec.codec_names():
        return f"codec: unknown codec {request.codec!r}; known: {', '.join(codec.codec_names())}"
    return None


class EdgeServicer(meg_pb2_grpc.EdgeGenerationServicer):
    def __init__(self, backend: TextToImageBackend, engine: BatchingEngine, metrics: MegMetrics) -> None:
        self.backend = backend
        self.engine = engine
        self.metrics = metrics
        # Codec encoding runs here, off the event loop and off the compute thread, so it overlaps the next
        # batch's denoising.
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="edge-encode")
        self._codec_weights = Path(codec.__file__).resolve().parent / "weights"

    async def Generate(self, request: meg_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[meg_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        token = set_request_id(request_id)
        channel_model = request.channel.model or "ideal"
        snr = request.channel.snr_db if request.channel.HasField("snr_db") else None
        # Label values come from fixed sets only: a request's free text must not create metric series.
        codec_label = request.codec if request.codec in codec.codec_names() else "invalid"
        channel_label = channel_model if channel_model in CHANNEL_LABELS else "other"
        labels = self.metrics.labels(self.backend.model_id, codec_label, channel_label, snr)
        self.metrics.in_flight.labels("edge").inc()
        status = "ok"
        try:
            problem = validate_request(request)
            if problem:
                status = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            try:
                shape = self.backend.latent_shape(request.height, request.width)
                params = dict(request.codec_params)
                # SNR-adaptive codecs (JSCC) take the link's SNR as side information.
                if snr is not None and channel_model != "ideal":
                    params.setdefault("channel_snr_db", f"{snr:g}")
                feature_codec = codec.build_codec(request.codec, params, self._codec_weights)
            except (ValueError, CodecError) as exc:
                status = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            loop = asyncio.get_running_loop()
            job = Job(request_id, request.prompt, request.seed, request.steps, request.guidance_scale,
                      request.split_step, shape, loop, loop.create_future())
            try:
                result = await self.engine.submit(job)
            except QueueFullError as exc:
                status = "overloaded"
                self.metrics.error("queue_full")
                await context.send_initial_metadata((("retry-after", f"{exc.retry_after_s:.0f}"),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except EngineStoppedError as exc:
                status = "unavailable"
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            t_enc = time.perf_counter()
            tensor_name = "noisy_latents" if request.split_step else "latents"
            features = {tensor_name: result.latents.unsqueeze(0)}
            try:
                payload = await loop.run_in_executor(self._encode_pool, feature_codec.encode, features)
            except CodecError as exc:
                # Parameters that only show their problem on real features (e.g. a codec_param out of range
                # for this tensor) are the caller's error, not the server's.
                status = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"codec_params: {exc}")
            encode_s = time.perf_counter() - t_enc
            for stage, seconds in (("queue_wait", result.queue_s), ("text_encode", result.text_encode_s),
                                   ("denoise", result.denoise_s), ("encode", encode_s)):
                self.metrics.observe_stage(labels, stage, seconds)
            timings = meg_pb2.StageTimings(queue_ms=1e3 * result.queue_s, text_encode_ms=1e3 * result.text_encode_s,
                                           denoise_ms=1e3 * result.denoise_s, encode_ms=1e3 * encode_s,
                                           batch_size=result.batch_size)
            yield wire.header_frame(payload, request_id=request_id, model_id=self.backend.model_id,
                                    codec_id=request.codec, timings=timings, split_step=request.split_step,
                                    total_steps=request.steps, guidance_scale=request.guidance_scale,
                                    prompt=request.prompt)
            chunks = 0
            for frame in wire.chunk_frames(payload):
                chunks += 1
                yield frame
            if request.reference:
                yield wire.reference_frame(features)
            yield wire.trailer_frame(payload, chunks)
            log.info("served %s: %s, %d bits, %d symbols, batch %d", request.codec, tuple(features[tensor_name].shape),
                     payload.bits_sent, payload.symbols_sent, result.batch_size)
        except asyncio.CancelledError:
            status = "cancelled"
            log.info("request cancelled by the client")
            raise
        finally:
            self.metrics.in_flight.labels("edge").dec()
            self.metrics.requests.labels("edge", codec_label, channel_label, status).inc()
            reset_request_id(token)


def grpc_server_options() -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 20_000),
            # Recycle connections so channel emulators discover edge pods the autoscaler adds.
            ("grpc.max_connection_age_ms", 60_000), ("grpc.max_connection_age_grace_ms", 120_000)]


async def serve(config: EdgeConfig, ready: asyncio.Event | None = None,
                credentials: grpc.ServerCredentials | None = None) -> None:
    """Run the edge until SIGINT/SIGTERM, then drain in-flight work for up to ``grace_s``."""
    metrics = MegMetrics("edge")
    backend = load_backend(config.model_dir, device=config.device, dtype=config.torch_dtype())
    engine = BatchingEngine(backend, config.engine, metrics)
    server = grpc.aio.server(options=grpc_server_options())
    wire.add_generation_servicer(EdgeServicer(backend, engine, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"edge could not bind {address}")
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("edge serving %s on %s (metrics :%s), batch ≤ %d, window %.0f ms, queue ≤ %d, cpu threads %s",
             backend.model_id, address, config.metrics_port or "off", config.engine.max_batch,
             config.engine.window_ms, config.engine.max_queue, engine.cpu_threads or "-")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("edge shutting down: draining for up to %.0f s", config.grace_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await loop.run_in_executor(None, engine.stop, True, config.grace_s)

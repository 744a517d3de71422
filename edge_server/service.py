"""The edge gRPC service (``meg.v1.EdgeGeneration/Generate``) as a :class:`serving.contract.StreamingApi`:

* ``decode_request`` validates the request (naming the field) and builds the denoising job and the codec;
* ``run`` queues the job on the step scheduler (:mod:`serving.scheduler`) and encodes the latents;
* ``encode_response`` frames header, chunks, optional reference and trailer.

Request ids, the in-flight gauge, the request counter and status mapping are the shared adapter's
(:mod:`serving.grpc_service`), and so is the server with its health checks and graceful drain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
import torch

import codec
from codec.base import CodecError
from codec.registry import check_request_params
from codec.adaptation import AUTO, TABLE_FILE as ADAPTATION_TABLE, AdaptationTable
from codec.image_sets import image_set_dir
from codec.sets import IMAGE_SOURCE, IMAGE_SPLIT, codec_set_identity
from edge_server.diffusion import DiffusionJob, DiffusionStepModel
from edge_server.llm import SESSION_SERVICE, LlmEdgeConfig, LlmEdgeStepModel, LlmSessionApi
from serving.scheduler import (
    Completion, QueueFullError, SchedulerConfig, SchedulerStoppedError, StepScheduler,
)
from edge_server.watchdog import progress_watchdog
from meg.v1 import meg_pb2
from models.backends import TextToImageBackend, load_backend
from models.llm.loader import llm_model_id, load_llm
from radio import channel_names, is_noiseless
from serving.contract import CallContext, RequestError, Status, StreamingApi
from serving.grpc_service import SERVING, GrpcServerConfig, add_session_api, add_streaming_api, run_grpc_service
from serving.registry import UnknownNameError
from telemetry.metrics import MegMetrics
from wire import framing

log = logging.getLogger(__name__)

SERVICE_NAME = "meg.v1.EdgeGeneration"
MAX_PROMPT_CHARS = 500
MAX_STEPS = 200
MAX_REQUEST_BYTES = 64 * 1024
MAX_GUIDANCE = 50.0


def default_model_dir() -> Path:
    """The embedded default model family, committed with the project."""
    return Path(__file__).resolve().parent.parent / "models" / "shapes_v1"


#: Default compute budget of one request: pixels × steps of a 512×512 image at 50 steps.
DEFAULT_MAX_PIXEL_STEPS = 512 * 512 * 50


@dataclass
class EdgeConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9101, metadata={"help": "Prometheus metrics port (0 disables)"})
    model_dir: Path = field(default_factory=default_model_dir, metadata={
        "help": "diffusers folder (default: the embedded models/shapes_v1)"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    engine: SchedulerConfig = field(default_factory=SchedulerConfig)
    llm: LlmEdgeConfig = field(default_factory=LlmEdgeConfig)
    grace_s: float = field(default=10.0, metadata={"help": "seconds to drain in-flight work at shutdown"})
    max_pixel_steps: int = field(default=512 * 512 * 50, metadata={
        "help": "per-request compute budget, height × width × steps (default: 512×512 at 50 steps)"})
    insecure_grpc: bool = field(default=False, metadata={
        "help": "serve plaintext gRPC off loopback (default: refused without --tls-dir)"})
    watchdog_s: float = field(default=120.0, metadata={
        "help": "report NOT_SERVING when one denoising step has run this long (a stuck compute worker)"})

    def torch_dtype(self) -> torch.dtype:
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]
        except KeyError:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}") from None


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
    if request.codec not in codec.codec_names(IMAGE_SOURCE) and request.codec != AUTO:
        return f"codec: unknown codec {request.codec!r}; known: {', '.join(codec.codec_names(IMAGE_SOURCE))}"
    return None


def channel_label(model: str) -> str:
    """A bounded metric label for a channel model name: registered names as they are, else "other"
    (the edge does not validate the channel; the channel emulator does)."""
    if not model:
        return "-"
    return model if model in channel_names() else "other"


def link_is_noisy(model: str) -> bool:
    """Whether the link adds noise; a model the edge does not know counts as noisy (the emulator decides)."""
    if not model:
        return False
    try:
        return not is_noiseless(model)
    except UnknownNameError:
        return True


@dataclass
class EdgeWork:
    """A validated request: the denoising job and the codec that will encode its result."""

    request: meg_pb2.GenerateRequest
    job: DiffusionJob
    codec: codec.Codec
    codec_name: str = ""                    # the concrete codec (what "auto" chose, else the request's)
    choice: meg_pb2.CodecChoice | None = None


@dataclass
class EdgeResult:
    work: EdgeWork
    completion: Completion[torch.Tensor]
    features: dict[str, torch.Tensor]
    payload: codec.EncodedPayload
    encode_s: float


@dataclass
class _AutoChoice:
    chosen_codec: str
    message: meg_pb2.CodecChoice
    params: dict[str, str]


class EdgeApi(StreamingApi[meg_pb2.GenerateRequest, EdgeWork, EdgeResult, meg_pb2.GenerateResponse]):
    service = "edge"

    def __init__(self, backend: TextToImageBackend, scheduler: StepScheduler, metrics: MegMetrics,
                 encode_threads: int | None = None, max_pixel_steps: int = DEFAULT_MAX_PIXEL_STEPS,
                 model_dir: Path | None = None) -> None:
        self.backend = backend
        self.max_pixel_steps = max_pixel_steps
        self.scheduler = scheduler
        self.metrics = metrics
        # Codec encoding runs here, off the event loop and off the compute thread, so it overlaps the next
        # steps' denoising. Its threads set their own torch thread count (torch's is per thread).
        threads = encode_threads or scheduler.cpu_threads
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="edge-encode",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None)
        # The image codec set of the model this edge runs (<model dir>/codecs/image-k0): codecs read their fitted
        # data there and nowhere else, and every header names it so the device can refuse another set's payload.
        # Read once: a set changes only with a restart.
        self.codec_set_dir = image_set_dir(model_dir if model_dir is not None else backend.path)
        self._adaptation: AdaptationTable | None = None  # loaded on the first "auto" request
        self.codec_set = codec_set_identity(self.codec_set_dir, backend.model_id, IMAGE_SPLIT, IMAGE_SOURCE)
        log.info("image codec set %s (%s)", self.codec_set[0], self.codec_set[1][:16] or
                 f"none at {self.codec_set_dir}: only codecs without fitted data are served")

    def metric_labels(self, request: meg_pb2.GenerateRequest) -> tuple[str, str]:
        codec_label = request.codec if request.codec in (*codec.codec_names(IMAGE_SOURCE), AUTO) else "invalid"
        return codec_label, channel_label(request.channel.model)

    async def decode_request(self, request: meg_pb2.GenerateRequest, ctx: CallContext) -> EdgeWork:
        problem = validate_request(request)
        if problem:
            raise RequestError(Status.INVALID, problem)
        # What the transmitter knows of the link: the receiver's estimate fed back by the channel emulator (a
        # request that did not cross the emulator falls back to the requested SNR).
        requested = request.channel.params.get("snr_db") if link_is_noisy(request.channel.model) else None
        snr = request.csi.snr_estimate_db if request.HasField("csi") else requested
        codec_label, chan_label = self.metric_labels(request)
        ctx.labels = self.metrics.labels(self.backend.model_id, codec_label, chan_label, requested)
        try:
            shape = self.backend.latent_shape(request.height, request.width)
            params = dict(request.codec_params)
            name, choice = request.codec, None
            if name == AUTO:
                choice = self._choose(request, params, snr if link_is_noisy(request.channel.model) else None)
                name, params = choice.chosen_codec, dict(choice.params)
            # SNR-adaptive codecs (JSCC) take the link's SNR as side information.
            check_request_params(name, params)
            self._check_budget(request, shape)
            if snr is not None:
                params.setdefault("channel_snr_db", f"{snr:g}")
            feature_codec = codec.build_codec(name, params, self.codec_set_dir)
        except (ValueError, CodecError) as exc:
            raise RequestError(Status.INVALID, str(exc)) from None
        job = DiffusionJob(request.prompt, request.seed, request.steps, request.guidance_scale, request.split_step,
                           shape)
        return EdgeWork(request, job, feature_codec, name, choice.message if choice else None)

    def _choose(self, request: meg_pb2.GenerateRequest, params: dict[str, str], snr: float | None) -> "_AutoChoice":
        """Link adaptation: the scheme the measured table expects to do best at the estimated SNR."""
        extra = set(params) - {"budget_symbols"}
        if extra:
            raise CodecError(f"codec_params.{sorted(extra)[0]}: codec 'auto' takes only budget_symbols")
        budget = float(params["budget_symbols"]) if "budget_symbols" in params else None
        if self._adaptation is None:
            self._adaptation = AdaptationTable.load(self.codec_set_dir / ADAPTATION_TABLE)
        # Only an estimate from pilots strays; with perfect CSI the emulator reports the true SNR (0 pilots).
        estimated = request.HasField("csi") and request.csi.pilot_symbols > 0
        picked = self._adaptation.choose(request.channel.model or "ideal", snr, budget, estimated)
        link = picked.scheme.link
        message = meg_pb2.CodecChoice(
            chosen=picked.scheme.name, reason=picked.reason, snr_estimate_db=snr if snr is not None else math.inf,
            modulation=str(link.get("modulation", "")), fec=str(link.get("fec", "")),
            code_rate=float(link.get("code_rate") or 0.0), expected_quality=picked.expected)
        log.info("auto: %s", picked.reason)
        return _AutoChoice(picked.scheme.codec, message, dict(picked.scheme.params))

    def _check_budget(self, request: meg_pb2.GenerateRequest, shape: tuple[int, int, int]) -> None:
        """Refuse a request whose compute (pixels × steps) is over the budget: one huge valid request would
        otherwise hold the compute worker for minutes while everyone else times out."""
        factor = self.backend.vae_scale_factor
        height, width = shape[1] * factor, shape[2] * factor
        cost = height * width * request.steps
        if cost > self.max_pixel_steps:
            raise CodecError(f"steps: {height}×{width} pixels × {request.steps} steps = {cost} pixel-steps is over "
                             f"this edge's budget of {self.max_pixel_steps}")

    async def run(self, work: EdgeWork, ctx: CallContext) -> EdgeResult:
        try:
            completion = await self.scheduler.submit(work.job, ctx.request_id)
        except QueueFullError as exc:
            raise RequestError(Status.OVERLOADED, str(exc), retry_after_s=exc.retry_after_s) from None
        except SchedulerStoppedError as exc:
            raise RequestError(Status.UNAVAILABLE, str(exc)) from None
        tensor_name = "noisy_latents" if work.job.split_step else "latents"
        features = {tensor_name: completion.value.unsqueeze(0)}
        started = time.perf_counter()
        try:
            payload = await asyncio.get_running_loop().run_in_executor(self._encode_pool, work.codec.encode,
                                                                       features)
        except CodecError as exc:
            # Parameters that only show their problem on real features (e.g. a codec_param out of range for
            # this tensor) are the caller's error, not the server's.
            raise RequestError(Status.INVALID, f"codec_params: {exc}") from None
        result = EdgeResult(work, completion, features, payload, time.perf_counter() - started)
        self._observe(result, ctx)
        return result

    def _observe(self, result: EdgeResult, ctx: CallContext) -> None:
        c = result.completion
        for stage, seconds in (("queue_wait", c.queue_s), ("text_encode", c.admit_s), ("denoise", c.run_s),
                               ("encode", result.encode_s)):
            self.metrics.observe_stage(ctx.labels, stage, seconds)

    async def encode_response(self, result: EdgeResult, ctx: CallContext) -> AsyncIterator[meg_pb2.GenerateResponse]:
        request, c, payload = result.work.request, result.completion, result.payload
        timings = meg_pb2.StageTimings(queue_ms=1e3 * c.queue_s, text_encode_ms=1e3 * c.admit_s,
                                       denoise_ms=1e3 * c.run_s, encode_ms=1e3 * result.encode_s,
                                       batch_size=round(c.mean_batch))
        yield framing.header_frame(payload, request_id=ctx.request_id, model_id=self.backend.model_id,
                                   codec_id=result.work.codec_name or request.codec, choice=result.work.choice,
                                   timings=timings, split_step=request.split_step,
                                   total_steps=request.steps, guidance_scale=request.guidance_scale,
                                   prompt=request.prompt, codec_set=self.codec_set[0],
                                   codec_set_hash=self.codec_set[1])
        chunks = 0
        for frame in framing.chunk_frames(payload):
            chunks += 1
            yield frame
        if request.reference:
            yield framing.reference_frame(result.features)
        yield framing.trailer_frame(payload, chunks)
        log.info("served %s: %s, %d bits, %d symbols, %d steps at mean batch %.1f", request.codec,
                 tuple(next(iter(result.features.values())).shape), payload.bits_sent, payload.symbols_sent,
                 c.steps, c.mean_batch)

    def close(self) -> None:
        self._encode_pool.shutdown(wait=False, cancel_futures=True)


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
    cpu = backend.device.type == "cpu"
    scheduler = StepScheduler(DiffusionStepModel(backend), config.engine, metrics, cpu=cpu, name="edge-compute")
    api = EdgeApi(backend, scheduler, metrics, max_pixel_steps=config.max_pixel_steps, model_dir=config.model_dir)
    sessions = load_llm_sessions(config, metrics, cpu)
    # Under mutual TLS only the channel emulator may call the edge: no client skips the emulated link.
    peers = ("channel",) if credentials is not None else ()

    def register(server: grpc.aio.Server) -> None:
        add_streaming_api(server, api, metrics, SERVICE_NAME, "Generate", meg_pb2.GenerateRequest,
                          meg_pb2.GenerateResponse, allowed_peers=peers)
        if sessions is not None:
            add_session_api(server, "edge", sessions.handle, metrics, SESSION_SERVICE, "Session",
                            meg_pb2.SessionUp, meg_pb2.SessionDown, allowed_peers=peers)

    async def on_stop() -> None:
        stops = [scheduler] + ([sessions.scheduler] if sessions is not None else [])
        for s in stops:
            await asyncio.get_running_loop().run_in_executor(None, s.stop, True, config.grace_s)
        api.close()

    e = config.engine
    log.info("edge model %s, %s scheduler, batch ≤ %d, window %.0f ms, queue ≤ %d, cpu threads %s",
             backend.model_id, e.policy, e.max_batch, e.window_ms, e.max_queue, scheduler.cpu_threads or "-")
    server = GrpcServerConfig("edge", config.host, config.port, config.metrics_port, config.grace_s,
                              grpc_server_options(), insecure=config.insecure_grpc)
    watchdog = progress_watchdog(scheduler, ("", SERVICE_NAME), config.watchdog_s)
    health = {SERVICE_NAME: SERVING, **({SESSION_SERVICE: SERVING} if sessions is not None else {})}
    await run_grpc_service(server, register, metrics, credentials=credentials, health_status=health,
                           background=[watchdog], on_stop=on_stop, ready=ready)


def load_llm_sessions(config: EdgeConfig, metrics: MegMetrics, cpu: bool) -> LlmSessionApi | None:
    """The split language model's session service, or None when disabled."""
    if not config.llm.llm_enabled:
        return None
    llm = load_llm(config.llm.llm_dir, device=config.device, dtype=config.torch_dtype())
    scheduler = StepScheduler(LlmEdgeStepModel(), config.llm.scheduler(), metrics, cpu=cpu, name="edge-llm")
    api = LlmSessionApi(llm, llm_model_id(config.llm.llm_dir), config.llm, scheduler, metrics)
    log.info("edge LLM %s: %d layers, default split k=%d, sessions ≤ %d, KV ≤ %.0f MiB", api.model_id,
             api.num_layers, api.default_split, config.llm.llm_max_sessions, config.llm.llm_max_kv_mb)
    return api

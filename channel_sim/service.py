"""The channel emulator: a gRPC proxy between device and edge that applies a wireless link to each stream.

It serves the same ``meg.v1.EdgeGeneration`` service as the edge, through the serving contract:
``decode_request`` parses the request's link (:class:`radio.ChannelSpec`, errors name the field), ``run``
forwards the call upstream (propagating the caller's deadline), reassembles the payload and passes it through
the link (:class:`radio.link.Link`, the same code the benchmarks run), and ``encode_response`` releases the
chunks at the link's symbol rate after its propagation delay, so airtime is real wall-clock time. The header
travels first (control channel); the trailer carries a :class:`ChannelReport` and a CRC of what the emulator
delivers. The emulator imports no codec: it carries payloads without decoding them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meg.v1 import meg_pb2, meg_pb2_grpc
from radio import ChannelError, ChannelSpec, channel_names
from radio.link import Link, LinkResult, generator_for
from serving.contract import CallContext, RequestError, Status, StreamingApi
from channel_sim.llm_session import SESSION_SERVICE, LlmSessionProxy
from serving.grpc_service import (
    NOT_SERVING, SERVING, GrpcServerConfig, add_session_api, add_streaming_api, run_grpc_service,
)
from telemetry.metrics import MegMetrics, shannon_capacity_bits_per_symbol
from wire import framing

log = logging.getLogger(__name__)

SERVICE_NAME = "meg.v1.EdgeGeneration"
UPSTREAM_HEALTH_PERIOD_S = 1.0
MAX_UPSTREAM_S = 600.0
#: Cap on gRPC reconnect backoff to the edge (ms), so a restarted edge is used again within seconds.
MAX_RECONNECT_BACKOFF_MS = 5000


@dataclass
class ChannelServiceConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=50052, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9102, metadata={"help": "Prometheus metrics port (0 disables)"})
    edge: str = field(default="127.0.0.1:50051", metadata={"help": "edge address host:port"})
    grace_s: float = field(default=10.0, metadata={"help": "seconds to drain streams at shutdown"})
    insecure_grpc: bool = field(default=False, metadata={
        "help": "serve plaintext gRPC off loopback (default: refused without --tls-dir)"})


class EdgeUpstream:
    """The emulator's gRPC channel to the edge (round-robin over a headless Service in Kubernetes)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin"),
                   # gRPC's default backoff grows to 120 s: an edge restarted after a long outage would stay
                   # unused for up to two minutes.
                   ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        self._channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials
                         else grpc.aio.insecure_channel(target, options=options))
        self._stub = meg_pb2_grpc.EdgeGenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    async def serving(self) -> bool:
        try:
            resp = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == SERVING

    async def fetch(self, request: meg_pb2.GenerateRequest, timeout_s: float) -> framing.ReceivedStream:
        """The edge's whole stream for ``request``; upstream failures become :class:`RequestError`."""
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            return await framing.assemble_call(call)
        except grpc.aio.AioRpcError as exc:
            raise await _upstream_error(call, exc) from exc
        except framing.StreamError as exc:
            raise RequestError(Status.BAD_STREAM, f"edge sent a bad stream: {exc}", label="bad_upstream_stream") \
                from exc

    async def close(self) -> None:
        await self._channel.close()


async def _upstream_error(call: grpc.aio.UnaryStreamCall, exc: grpc.aio.AioRpcError) -> RequestError:
    code = exc.code()
    status = Status.from_grpc_name(code.name)
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"edge unreachable: {exc.details()}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = "deadline exceeded while waiting for the edge"
    else:
        message = exc.details() or code.name
    retry = dict(await call.initial_metadata() or ()).get("retry-after")
    return RequestError(status, message, float(retry) if retry else None, label=f"upstream_{code.name.lower()}")


@dataclass
class LinkWork:
    request: meg_pb2.GenerateRequest
    spec: ChannelSpec
    probe_pilots: int = 0
    arrived: float = field(default_factory=time.monotonic)  # an SNR trace runs from here


@dataclass
class Delivery:
    """What crossed the link for one request, ready to be paced out."""

    work: LinkWork
    received: framing.ReceivedStream
    link: LinkResult
    started: float


class ChannelApi(StreamingApi[meg_pb2.GenerateRequest, LinkWork, Delivery, meg_pb2.GenerateResponse]):
    service = "channel"

    def __init__(self, upstream: EdgeUpstream, link: Link, metrics: MegMetrics) -> None:
        self.upstream = upstream
        self.link = link
        self.metrics = metrics

    def metric_labels(self, request: meg_pb2.GenerateRequest) -> tuple[str, str]:
        # The codec label is refined from the edge's header (the edge validates codec names).
        model = request.channel.model or "ideal"
        return "-", model if model in channel_names() else "invalid"

    async def decode_request(self, request: meg_pb2.GenerateRequest, ctx: CallContext) -> LinkWork:
        try:
            spec = ChannelSpec.from_proto(request.channel)
            self.link.check(spec)
        except ChannelError as exc:
            raise RequestError(Status.INVALID, str(exc)) from exc
        return LinkWork(request, spec)

    async def run(self, work: LinkWork, ctx: CallContext) -> Delivery:
        generator = generator_for(work.spec.link.seed)
        work.probe_pilots = await self._feed_back_csi(work, generator)
        remaining = ctx.time_remaining()
        timeout = min(remaining, MAX_UPSTREAM_S) if remaining else MAX_UPSTREAM_S
        try:
            received = await self.upstream.fetch(work.request, timeout)
        except RequestError as exc:
            self.metrics.error(exc.label)
            raise
        ctx.labels["codec"] = received.header.codec_id
        # The payload leaves now, after the edge's compute: on a changing channel the SNR it meets is the
        # trace's value now, not the one the CSI estimate saw on arrival.
        work.spec = work.spec.at(1e3 * (time.monotonic() - work.arrived))
        choice = received.header.choice
        if choice.fec:  # the edge's link adaptation chose a digital scheme: its transceiver applies
            try:
                work.spec = work.spec.with_digital_link(choice.modulation, choice.fec, choice.code_rate or None)
            except ChannelError as exc:
                raise RequestError(Status.BAD_STREAM, f"edge chose an unusable link: {exc}",
                                   label="bad_upstream_stream") from exc
        started = time.perf_counter()
        link = await asyncio.get_running_loop().run_in_executor(
            None, self.link.send, work.spec, received.payload, generator)
        link.symbols += work.probe_pilots
        link.pilot_symbols += work.probe_pilots
        return Delivery(work, received, link, started)

    async def _feed_back_csi(self, work: LinkWork, generator: torch.Generator) -> int:
        """Measure the link as its receiver would and hand the estimate to the edge with the request, after
        the link's feedback delay (a transmitter never knows the true SNR). Returns the pilots spent."""
        snr_db, pilots = self.link.probe(work.spec, generator)
        if snr_db is None:
            return 0
        delay_ms = work.spec.link.feedback_delay_ms
        self.metrics.link_snr_estimate_db.labels(self.service, work.spec.model).set(snr_db)
        work.request.csi.CopyFrom(meg_pb2.ChannelStateInfo(snr_estimate_db=snr_db, pilot_symbols=pilots,
                                                           age_ms=delay_ms))
        await asyncio.sleep(delay_ms / 1000.0)
        return pilots

    async def encode_response(self, d: Delivery, ctx: CallContext) -> AsyncIterator[meg_pb2.GenerateResponse]:
        yield meg_pb2.GenerateResponse(header=d.received.header)  # the control channel, uncorrupted
        spec, link = d.work.spec, d.link
        airtime_s = link.airtime_s(spec)
        # Release chunks at the symbol rate after the propagation delay: airtime is wall-clock time.
        t0 = time.perf_counter() + spec.link.delay_ms / 1000.0
        frames = list(framing.chunk_frames(link.payload))
        per_chunk = airtime_s / max(1, len(frames))
        for i, frame in enumerate(frames):
            await asyncio.sleep(max(0.0, t0 + (i + 1) * per_chunk - time.perf_counter()))
            yield frame
        await asyncio.sleep(max(0.0, t0 + airtime_s - time.perf_counter()))
        if d.received.reference:
            yield framing.reference_frame(d.received.reference)
        channel_s = time.perf_counter() - d.started
        yield framing.trailer_frame(link.payload, len(frames), self._report(d, airtime_s, channel_s))
        self._observe(d, ctx, airtime_s, channel_s)

    @staticmethod
    def _report(d: Delivery, airtime_s: float, channel_s: float) -> meg_pb2.ChannelReport:
        spec, link = d.work.spec, d.link
        digital = link.payload.kind == "digital"
        return meg_pb2.ChannelReport(
            model=spec.model, snr_db=spec.snr_db if spec.snr_db is not None else math.inf,
            bandwidth_hz=spec.link.bandwidth_hz, delay_ms=spec.link.delay_ms, symbols=link.symbols,
            airtime_ms=1e3 * airtime_s, bit_errors=link.bit_errors, bits=link.bits,
            modulation=spec.link.modulation if digital else "analog", channel_ms=1e3 * channel_s,
            erased=[meg_pb2.ByteRange(start=a, end=b) for a, b in link.erased], pilot_symbols=link.pilot_symbols)

    def _observe(self, d: Delivery, ctx: CallContext, airtime_s: float, channel_s: float) -> None:
        spec, link = d.work.spec, d.link
        labels = self.metrics.labels(d.received.header.model_id, ctx.labels["codec"], spec.model, spec.snr_db)
        self.metrics.observe_stage(labels, "airtime", airtime_s)
        self.metrics.observe_stage(labels, "channel", channel_s)
        self.metrics.request_symbols.labels(**labels).observe(link.symbols)
        if spec.snr_db is not None:
            self.metrics.link_snr_db.labels(self.service, spec.model).set(spec.snr_db)
        if link.payload.kind == "digital":
            self.metrics.payload_bytes.labels(**labels).observe(d.received.payload.bits_sent / 8)
            if spec.snr_db is not None and link.symbols:
                self.metrics.rate_capacity_ratio.labels(**labels).observe(
                    delivered_bits(link) / link.symbols / shannon_capacity_bits_per_symbol(spec.snr_db))
        log.info("%s link: %d symbols, %.2f ms airtime, %d bit errors", spec.model, link.symbols, 1e3 * airtime_s,
                 link.bit_errors)


def delivered_bits(link: LinkResult) -> float:
    """Information the link really delivered: bits of code blocks that passed their CRC, and for uncoded QAM
    the payload bits times the capacity 1 − h(p) of the binary symmetric channel its errors make. Neither can
    exceed the channel's Shannon capacity, unlike the raw bits put on the air."""
    if link.bits == 0:
        return 0.0
    erased_bits = 8 * sum(end - start for start, end in link.erased)
    if link.erased or link.bit_errors == 0:
        return float(link.bits - erased_bits)
    p = min(0.5, link.bit_errors / link.bits)
    h = -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 0.5 else (1.0 if p == 0.5 else 0.0)
    return link.bits * (1.0 - h)


def _watch_upstream(upstream: EdgeUpstream) -> Callable[[health.aio.HealthServicer], Awaitable[None]]:
    async def watch(health_servicer: health.aio.HealthServicer) -> None:
        """Publish the edge's reachability as the health of SERVICE_NAME, so the device can say which hop is
        down."""
        last = None
        while True:
            serving = await upstream.serving()
            if serving != last:
                await health_servicer.set(SERVICE_NAME, SERVING if serving else NOT_SERVING)
                log.info("edge upstream is %s", "serving" if serving else "NOT serving")
                last = serving
            await asyncio.sleep(UPSTREAM_HEALTH_PERIOD_S)
    return watch


def _warm_up(link: Link) -> Callable[[health.aio.HealthServicer], Awaitable[None]]:
    async def warm(_: health.aio.HealthServicer) -> None:
        # Sionna (the LDPC chain) takes seconds to import and the uplink's code takes seconds to build: do both
        # now, off the event loop, rather than inside the first LLM session, whose every token would wait.
        uplink_probe = ChannelSpec.from_mapping({"model": "awgn", "snr_db": 10.0})
        await asyncio.get_running_loop().run_in_executor(None, link.send_control, uplink_probe, b"\0\0\0\0")
    return warm


async def serve(config: ChannelServiceConfig, ready: asyncio.Event | None = None,
                credentials: grpc.ServerCredentials | None = None,
                upstream_credentials: grpc.ChannelCredentials | None = None) -> None:
    metrics = MegMetrics("channel")
    # The link's work (channel draws, LDPC decoding) runs on the loop's default executor, many small calls at
    # once: one torch thread each, since OpenMP workers spin-waiting for busy cores made a 4-byte uplink block
    # take 0.7-1.4 s instead of 15-40 ms on the shared 2-core host.
    asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(
        max_workers=8, thread_name_prefix="channel-link", initializer=torch.set_num_threads, initargs=(1,)))
    upstream = EdgeUpstream(config.edge, upstream_credentials)
    api = ChannelApi(upstream, Link(), metrics)
    server_config = GrpcServerConfig(
        "channel emulator", config.host, config.port, config.metrics_port, config.grace_s,
        options=[("grpc.max_receive_message_length", 64 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)],
        insecure=config.insecure_grpc)
    # Under mutual TLS only the device may call the emulator (and only the emulator may call the edge).
    peers = ("device",) if credentials is not None else ()
    log.info("channel emulator → edge %s", config.edge)
    sessions = LlmSessionProxy(upstream.channel, api.link, metrics)

    def register(server: grpc.aio.Server) -> None:
        add_streaming_api(server, api, metrics, SERVICE_NAME, "Generate", meg_pb2.GenerateRequest,
                          meg_pb2.GenerateResponse, allowed_peers=peers)
        add_session_api(server, "channel", sessions.handle, metrics, SESSION_SERVICE, "Session", meg_pb2.SessionUp,
                        meg_pb2.SessionDown, allowed_peers=peers)

    await run_grpc_service(
        server_config, register,
        metrics, credentials=credentials, health_status={SERVICE_NAME: NOT_SERVING},
        background=[_watch_upstream(upstream), _warm_up(api.link)], on_stop=upstream.close, ready=ready)

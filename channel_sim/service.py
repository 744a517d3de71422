"""The channel emulator: a gRPC proxy between device and edge that applies a wireless link to each stream.

It serves the same ``meg.v1.EdgeGeneration`` service as the edge. Per request it forwards the call upstream
(propagating the caller's deadline), buffers the payload, passes it through the requested channel model
(:mod:`channel_sim.channels`), then releases the chunks at the link's symbol rate after its propagation
delay, so airtime is real wall-clock time. The header travels first (control channel); the trailer carries
a :class:`ChannelReport` and a CRC of what the emulator delivers.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from channel_sim.channels import (
    DEFAULT_BANDWIDTH_HZ, DEFAULT_COHERENCE_SYMBOLS, DEFAULT_DELAY_MS, DEFAULT_K_FACTOR, DEFAULT_SNR_DB,
    ChannelConfig, ChannelError, build_channel, channel_names, transmit_bytes_uncoded,
)
import codec
from codec import wire
from codec.base import EncodedPayload
from meg.v1 import meg_pb2, meg_pb2_grpc
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics, shannon_capacity_bits_per_symbol

log = logging.getLogger(__name__)

SERVICE_NAME = "meg.v1.EdgeGeneration"
UPSTREAM_HEALTH_PERIOD_S = 1.0
MAX_UPSTREAM_S = 600.0
#: Cap on gRPC reconnect backoff to the edge (ms), so a restarted edge is used again within seconds.
MAX_RECONNECT_BACKOFF_MS = 5000


@dataclass
class ChannelServiceConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address the gRPC proxy binds"})
    port: int = field(default=50052, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=9102, metadata={"help": "Prometheus metrics port (0 disables)"})
    edge: str = field(default="127.0.0.1:50051", metadata={"help": "edge address host:port"})
    grace_s: float = field(default=10.0, metadata={"help": "seconds to drain requests in flight on shutdown"})


def config_from_spec(spec: meg_pb2.ChannelSpec) -> ChannelConfig:
    """The validated channel config of a request (defaults for unset fields); raises ChannelError."""
    return ChannelConfig(
        model=spec.model or "ideal",
        snr_db=spec.snr_db if spec.HasField("snr_db") else DEFAULT_SNR_DB,
        bandwidth_hz=spec.bandwidth_hz if spec.HasField("bandwidth_hz") else DEFAULT_BANDWIDTH_HZ,
        delay_ms=spec.delay_ms if spec.HasField("delay_ms") else DEFAULT_DELAY_MS,
        k_factor=spec.k_factor if spec.HasField("k_factor") else DEFAULT_K_FACTOR,
        coherence_symbols=spec.coherence_symbols if spec.HasField("coherence_symbols") else DEFAULT_COHERENCE_SYMBOLS,
        modulation=spec.modulation or "qpsk",
        seed=spec.seed if spec.HasField("seed") else None,
    ).validate()


@dataclass
class LinkResult:
    payload: EncodedPayload
    symbols: int
    bits: int
    bit_errors: int


def apply_link(config: ChannelConfig, payload: EncodedPayload, rng: np.random.Generator,
               fec: str = "none", code_rate: float | None = None) -> LinkResult:
    """Pass one payload through the link: analog symbols get channel noise, digital bytes go through QAM
    (uncoded, or the LDPC digital chain when ``fec == "ldpc"``)."""
    channel = build_channel(config)
    if payload.kind == "analog":
        received = channel.apply_analog(payload.symbols, rng)
        out = EncodedPayload("analog", payload.tensors, payload.params, symbols=received)
        return LinkResult(out, int(received.size), 0, 0)
    if fec == "ldpc":
        from channel_sim.digital import DigitalChain, DigitalChainConfig

        chain = DigitalChain(DigitalChainConfig(modulation=config.modulation,
                                                code_rate=code_rate if code_rate else 0.5))
        res = chain.transmit(payload.data, channel, rng)
        out = EncodedPayload("digital", payload.tensors, payload.params, data=res.data)
        # Bit errors of what is delivered (erased blocks arrive zeroed): the device conceals when they are > 0.
        delivered = np.frombuffer(res.data, np.uint8) ^ np.frombuffer(payload.data, np.uint8)
        return LinkResult(out, int(res.symbols), 8 * len(payload.data), int(np.unpackbits(delivered).sum()))
    res = transmit_bytes_uncoded(channel, payload.data, rng)
    out = EncodedPayload("digital", payload.tensors, payload.params, data=res.data)
    return LinkResult(out, res.symbols, 8 * len(payload.data), res.bit_errors)


def _upstream_error(exc: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str]:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return code, f"edge unreachable: {exc.details()}"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return code, "deadline exceeded while waiting for the edge"
    return code, exc.details() or code.name


class ChannelServicer(meg_pb2_grpc.EdgeGenerationServicer):
    def __init__(self, edge_target: str, metrics: MegMetrics,
                 channel_credentials: grpc.ChannelCredentials | None = None) -> None:
        # round_robin: with a headless edge Service (dns:///edge-headless...), spread requests over the edge fleet.
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin"),
                   # gRPC's default backoff grows to 120 s: an edge restarted after a long outage would stay
                   # unused for up to two minutes.
                   ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
        self._upstream = (grpc.aio.secure_channel(edge_target, channel_credentials, options=options)
                          if channel_credentials else grpc.aio.insecure_channel(edge_target, options=options))
        self._stub = meg_pb2_grpc.EdgeGenerationStub(self._upstream)
        self._health_stub = health_pb2_grpc.HealthStub(self._upstream)
        self.metrics = metrics

    async def upstream_serving(self) -> bool:
        try:
            resp = await self._health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.aio.AioRpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self._upstream.close()

    async def Generate(self, request: meg_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[meg_pb2.GenerateResponse]:
        request_id = request.request_id or uuid.uuid4().hex[:16]
        token = set_request_id(request_id)
        self.metrics.in_flight.labels("channel").inc()
        # Label values come from fixed sets only: a request's free text must not create metric series.
        codec_label = request.codec if request.codec in codec.codec_names() else "invalid"
        channel_label = (request.channel.model or "ideal") if (request.channel.model or "ideal") in channel_names() \
            else "invalid"
        status = "ok"
        call = None
        try:
            try:
                config = config_from_spec(request.channel)
            except ChannelError as exc:
                status = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            fec = request.channel.fec or "none"
            if fec not in ("none", "ldpc"):
                status = "invalid"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"channel.fec: unknown FEC {fec!r}; known: none, ldpc")
            code_rate = request.channel.code_rate if request.channel.HasField("code_rate") else None
            if fec == "ldpc":
                # Reject an unusable code before the edge does any work; the message names the field.
                from channel_sim.digital import DigitalChainConfig

                try:
                    DigitalChainConfig(modulation=config.modulation, code_rate=code_rate or 0.5).validate()
                except ValueError as exc:
                    status = "invalid"
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"channel.{exc}")
            labels = self.metrics.labels("-", codec_label, config.model,
                                         config.snr_db if config.noisy else None)
            # Propagate the caller's deadline; a caller without one still gets a bounded upstream call.
            remaining = context.time_remaining()
            call = self._stub.Generate(request, timeout=min(remaining, MAX_UPSTREAM_S) if remaining else MAX_UPSTREAM_S)
            assembler = wire.StreamAssembler()
            header = None
            try:
                async for frame in call:
                    if frame.WhichOneof("frame") == "header":
                        header = frame.header
                        labels["model"] = header.model_id
                        yield frame  # the control channel goes first, uncorrupted
                    assembler.add(frame)
                received = assembler.finish()
            except grpc.aio.AioRpcError as exc:
                status = "upstream_error"
                self.metrics.error("upstream_" + exc.code().name.lower())
                retry = dict(await call.initial_metadata() or ()).get("retry-after") if call else None
                if retry:
                    await context.send_initial_metadata((("retry-after", retry),))
                code, details = _upstream_error(exc)
                await context.abort(code, details)
            except wire.StreamError as exc:
                status = "bad_upstream_stream"
                self.metrics.error("bad_upstream_stream")
                await context.abort(grpc.StatusCode.DATA_LOSS, f"edge sent a bad stream: {exc}")
            started = time.perf_counter()
            rng = np.random.default_rng(config.seed)
            link = await asyncio.get_running_loop().run_in_executor(
                None, apply_link, config, received.payload, rng, fec, code_rate)
            airtime_s = link.symbols / config.bandwidth_hz
            # Release chunks at the symbol rate after the propagation delay: airtime is wall-clock time.
            t0 = time.perf_counter() + config.delay_ms / 1000.0
            frames = list(wire.chunk_frames(link.payload))
            per_chunk = airtime_s / max(1, len(frames))
            for i, frame in enumerate(frames):
                await asyncio.sleep(max(0.0, t0 + (i + 1) * per_chunk - time.perf_counter()))
                yield frame
            await asyncio.sleep(max(0.0, t0 + airtime_s - time.perf_counter()))
            if received.reference:
                yield wire.reference_frame(received.reference)
            channel_s = time.perf_counter() - started
            report = meg_pb2.ChannelReport(
                model=config.model, snr_db=config.snr_db if config.noisy else float("inf"),
                bandwidth_hz=config.bandwidth_hz, delay_ms=config.delay_ms, symbols=link.symbols,
                airtime_ms=1e3 * airtime_s, bit_errors=link.bit_errors, bits=link.bits,
                modulation=config.modulation if received.payload.kind == "digital" else "analog",
                channel_ms=1e3 * channel_s)
            yield wire.trailer_frame(link.payload, len(frames), report)
            self.metrics.observe_stage(labels, "airtime", airtime_s)
            self.metrics.observe_stage(labels, "channel", channel_s)
            self.metrics.request_symbols.labels(**labels).observe(link.symbols)
            if received.payload.kind == "digital":
                self.metrics.request_bits.labels(**labels).observe(received.payload.bits_sent)
                if config.noisy and link.symbols:
                    ratio = (link.bits / link.symbols) / shannon_capacity_bits_per_symbol(config.snr_db)
                    self.metrics.rate_capacity_ratio.labels(**labels).observe(ratio)
            log.info("%s link: %d symbols, %.2f ms airtime, %d bit errors", config.model, link.symbols,
                     1e3 * airtime_s, link.bit_errors)
        except asyncio.CancelledError:
            status = "cancelled"
            if call is not None:
                call.cancel()
            raise
        finally:
            self.metrics.in_flight.labels("channel").dec()
            self.metrics.requests.labels("channel", codec_label, channel_label, status).inc()
            reset_request_id(token)


async def _watch_upstream(servicer: ChannelServicer, health_servicer: health.aio.HealthServicer) -> None:
    """Publish the edge's reachability as the health of SERVICE_NAME, so the device can say which hop is down."""
    last = None
    while True:
        serving = await servicer.upstream_serving()
        if serving != last:
            status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
            await health_servicer.set(SERVICE_NAME, status)
            log.info("edge upstream is %s", "serving" if serving else "NOT serving")
            last = serving
        await asyncio.sleep(UPSTREAM_HEALTH_PERIOD_S)


async def serve(config: ChannelServiceConfig, ready: asyncio.Event | None = None,
                credentials: grpc.ServerCredentials | None = None,
                upstream_credentials: grpc.ChannelCredentials | None = None) -> None:
    metrics = MegMetrics("channel")
    servicer = ChannelServicer(config.edge, metrics, upstream_credentials)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    wire.add_generation_servicer(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"channel emulator could not bind {address}")
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    watcher = asyncio.create_task(_watch_upstream(servicer, health_servicer))
    # Sionna (the LDPC chain) takes seconds to import: do it now, off the event loop, rather than inside the
    # first fec="ldpc" request, where the import would stall every stream this process is pacing.
    warmup = asyncio.get_running_loop().run_in_executor(None, importlib.import_module,
                                                                      "channel_sim.digital")
    log.info("channel emulator on %s → edge %s (metrics :%s)", address, config.edge, config.metrics_port or "off")
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
    watcher.cancel()
    warmup.cancel()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.grace_s)
    await servicer.close()

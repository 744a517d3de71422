"""The gRPC side of the serving contract: one adapter for every streaming API and one server runner.

:func:`add_streaming_api` registers a :class:`~serving.contract.StreamingApi` as a server-streaming method. It
answers request bytes that do not parse with INVALID_ARGUMENT (grpc.aio's generated deserializer answers
UNKNOWN, which reads as a server bug), maps :class:`~serving.contract.RequestError` to its status (with
``retry-after`` metadata when given), and keeps the request id, the in-flight gauge and the request counter
for every service in one place. :func:`run_grpc_service` runs a server with health checks, a metrics
endpoint and a graceful drain on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from dataclasses import dataclass, field
import ipaddress
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, Sequence

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from serving.contract import CallContext, RequestError, Status, StreamingApi
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class _Undecodable:
    """What the handler receives instead of a request whose bytes do not parse."""

    reason: str


def _grpc_code(status: Status) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, status.grpc_name)


async def _abort(context: grpc.aio.ServicerContext, exc: RequestError) -> None:
    if exc.retry_after_s is not None:
        await context.send_initial_metadata((("retry-after", f"{max(1.0, exc.retry_after_s):.0f}"),))
    await context.abort(_grpc_code(exc.status), exc.message)


def _time_remaining(context: grpc.aio.ServicerContext) -> Callable[[], float | None]:
    return lambda: context.time_remaining()


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the caller's verified client certificate (mutual TLS), or None without TLS."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


async def _check_peer(context: grpc.aio.ServicerContext, service: str, metrics: MegMetrics,
                      allowed_peers: Collection[str]) -> None:
    if allowed_peers:
        peer = peer_identity(context)
        if peer is not None and peer not in allowed_peers:
            metrics.error("peer_refused")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"certificate {peer!r} may not call "
                                f"{service}; allowed: {', '.join(sorted(allowed_peers))}")


async def _guarded(frames: AsyncIterator[Any], ctx: CallContext, context: grpc.aio.ServicerContext,
                   metrics: MegMetrics, service: str) -> AsyncIterator[Any]:
    """Yield ``frames`` with the bookkeeping every call shares: request id, in-flight gauge, request counter
    (status "ok", the refusal's label, "cancelled" or "error"), and clean statuses for refusals and bugs."""
    token = set_request_id(ctx.request_id)
    metrics.in_flight.labels(service).inc()
    status = "ok"
    try:
        async for frame in frames:
            yield frame
    except RequestError as exc:
        status = exc.label
        await _abort(context, exc)
    except asyncio.CancelledError:
        status = "cancelled"
        log.info("request cancelled by the client")
        raise
    except Exception:
        # A bug must still end the call cleanly and be counted, never vanish as an "ok".
        status = "error"
        log.exception("request failed")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service log")
    finally:
        metrics.in_flight.labels(service).dec()
        metrics.requests.labels(service, ctx.labels["codec"], ctx.labels["channel"], status).inc()
        reset_request_id(token)


def streaming_handler(api: StreamingApi, metrics: MegMetrics, request_id_of: Callable[[Any], str],
                      allowed_peers: Collection[str] = ()) -> Callable[[Any, grpc.aio.ServicerContext],
                                                                      AsyncIterator[Any]]:
    """The gRPC handler of ``api``: decode_request → run → encode_response with shared bookkeeping.

    ``allowed_peers``: under mutual TLS, the certificate identities allowed to call (e.g. only the channel
    emulator may call the edge, so a device certificate cannot skip the emulated link)."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _check_peer(context, api.service, metrics, allowed_peers)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request does not parse: {request.reason}")
        ctx = CallContext(request_id_of(request) or uuid.uuid4().hex[:16], _time_remaining(context))
        codec_label, channel_label = api.metric_labels(request)
        ctx.labels.update(codec=codec_label, channel=channel_label)

        async def frames() -> AsyncIterator[Any]:
            work = await api.decode_request(request, ctx)
            result = await api.run(work, ctx)
            async for frame in api.encode_response(result, ctx):
                yield frame

        async for frame in _guarded(frames(), ctx, context, metrics, api.service):
            yield frame

    return handle


#: A bidirectional session: (the parsed incoming messages, the call's context) → the outgoing messages.
SessionHandler = Callable[[AsyncIterator[Any], CallContext], AsyncIterator[Any]]


def add_session_api(server: grpc.aio.Server, service: str, handler: SessionHandler, metrics: MegMetrics,
                    service_name: str, method: str, request_type: type[Message], response_type: type[Message],
                    allowed_peers: Collection[str] = ()) -> None:
    """Serve a bidirectional-streaming ``service_name/method`` with the same bookkeeping as
    :func:`add_streaming_api`; a message that does not parse ends the call with INVALID_ARGUMENT."""

    def parse(blob: bytes) -> Any:
        try:
            return request_type.FromString(blob)
        except DecodeError as exc:
            return _Undecodable(f"not a {request_type.DESCRIPTOR.full_name}: {exc}")

    async def checked(messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for message in messages:
            if isinstance(message, _Undecodable):
                raise RequestError(Status.INVALID, f"message does not parse: {message.reason}")
            yield message

    async def handle(messages: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _check_peer(context, service, metrics, allowed_peers)
        ctx = CallContext(uuid.uuid4().hex[:16], _time_remaining(context), {"codec": "-", "channel": "-"})
        async for frame in _guarded(handler(checked(messages), ctx), ctx, context, metrics, service):
            yield frame

    handlers = {method: grpc.stream_stream_rpc_method_handler(
        handle, request_deserializer=parse, response_serializer=response_type.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


def add_streaming_api(server: grpc.aio.Server, api: StreamingApi, metrics: MegMetrics, service_name: str,
                      method: str, request_type: type[Message], response_type: type[Message],
                      allowed_peers: Collection[str] = ()) -> None:
    """Serve ``api`` as the server-streaming ``service_name/method`` (``allowed_peers``: see
    :func:`streaming_handler`)."""

    def parse(blob: bytes) -> Any:
        try:
            return request_type.FromString(blob)
        except DecodeError as exc:
            return _Undecodable(f"not a {request_type.DESCRIPTOR.full_name}: {exc}")

    handler = streaming_handler(api, metrics, lambda r: getattr(r, "request_id", ""), allowed_peers)
    handlers = {method: grpc.unary_stream_rpc_method_handler(
        handler, request_deserializer=parse, response_serializer=response_type.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
    server.add_registered_method_handlers(service_name, handlers)


@dataclass
class GrpcServerConfig:
    """Where and how a gRPC service listens."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0                 # 0: no metrics endpoint
    grace_s: float = 10.0
    options: Sequence[tuple[str, Any]] = field(default_factory=list)
    #: serve plaintext gRPC off loopback (refused otherwise: anyone on the network could call it)
    insecure: bool = False


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address ("" and "0.0.0.0" bind every interface: not loopback)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class InsecureBindError(OSError):
    """Plaintext gRPC requested on a non-loopback address without an explicit opt-in."""


def check_exposure(config: GrpcServerConfig, has_tls: bool) -> None:
    """Off loopback, gRPC needs mutual TLS (``--tls-dir``); ``--insecure-grpc`` overrides, loudly."""
    if has_tls or is_loopback(config.host):
        return
    if not config.insecure:
        raise InsecureBindError(
            f"{config.name}: refusing plaintext gRPC on {config.host}: off loopback the gRPC ports need mutual "
            "TLS (`meg certs DIR`, then --tls-dir DIR on every service), or --insecure-grpc on a network you trust")
    log.warning("%s: PLAINTEXT gRPC on %s (--insecure-grpc): anyone who reaches this port can call it, "
                "bypassing the device's API key", config.name, config.host)


BackgroundTask = Callable[[health.aio.HealthServicer], Awaitable[None]]


async def run_grpc_service(config: GrpcServerConfig, register: Callable[[grpc.aio.Server], None],
                           metrics: MegMetrics, *, credentials: grpc.ServerCredentials | None = None,
                           health_status: dict[str, int] | None = None, background: Sequence[BackgroundTask] = (),
                           on_stop: Callable[[], Awaitable[None]] | None = None,
                           ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or until cancelled), then drain for up to ``grace_s``.

    ``health_status`` gives the initial health of named services ("" is the server as a whole, SERVING);
    ``background`` tasks get the health servicer (to publish readiness) and are cancelled at shutdown;
    ``on_stop`` runs after the server stopped (drain compute, close upstream channels).
    """
    check_exposure(config, credentials is not None)
    server = grpc.aio.server(options=list(config.options))
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not bound:
        raise OSError(f"{config.name} could not bind {address}")
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.host, registry=metrics.registry)
    await server.start()
    await health_servicer.set("", SERVING)
    for name, status in (health_status or {}).items():
        await health_servicer.set(name, status)
    tasks = [asyncio.create_task(task(health_servicer)) for task in background]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    log.info("%s serving on %s (metrics :%s)", config.name, address, config.metrics_port or "off")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        log.info("%s shutting down: draining for up to %.0f s", config.name, config.grace_s)
        for task in tasks:
            task.cancel()
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_s)
        if on_stop is not None:
            await on_stop()

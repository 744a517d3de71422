"""The device's side of the air interface: one streaming call to the channel emulator per request."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from wire import framing
from meg.v1 import meg_pb2, meg_pb2_grpc

log = logging.getLogger(__name__)

EDGE_SERVICE = "meg.v1.EdgeGeneration"
#: Retry-After (s) when the channel emulator or the edge is unreachable.
UNAVAILABLE_RETRY_AFTER_S = "2"


class LinkError(RuntimeError):
    """A failed call, with the HTTP status the REST API answers and a human reason."""

    def __init__(self, http_status: int, reason: str, kind: str, retry_after_s: str | None = None) -> None:
        super().__init__(reason)
        self.http_status = http_status
        self.reason = reason
        self.kind = kind
        self.retry_after_s = retry_after_s


_STATUS_MAP = {
    grpc.StatusCode.UNAVAILABLE: (503, "unavailable"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "overloaded"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "deadline"),
    grpc.StatusCode.INVALID_ARGUMENT: (422, "invalid"),
    grpc.StatusCode.DATA_LOSS: (502, "bad_stream"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


@dataclass
class DeviceLinkConfig:
    target: str = "127.0.0.1:50052"
    max_receive_bytes: int = 64 * 1024 * 1024
    max_reconnect_backoff_ms: int = 5000


class DeviceLink:
    """A long-lived gRPC channel to the channel emulator."""

    def __init__(self, config: DeviceLinkConfig, credentials: grpc.ChannelCredentials | None = None) -> None:
        options = [("grpc.max_receive_message_length", config.max_receive_bytes),
                   # gRPC's default reconnect backoff grows to 120 s; a restarted channel emulator should be
                   # used again within seconds.
                   ("grpc.max_reconnect_backoff_ms", config.max_reconnect_backoff_ms)]
        self.config = config
        self._channel = (grpc.aio.secure_channel(config.target, credentials, options=options) if credentials
                         else grpc.aio.insecure_channel(config.target, options=options))
        self._stub = meg_pb2_grpc.EdgeGenerationStub(self._channel)
        self._sessions = meg_pb2_grpc.LlmSessionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def generate(self, request: meg_pb2.GenerateRequest, timeout_s: float) -> framing.ReceivedStream:
        """Run one request end to end; raises :class:`LinkError` (never a raw gRPC error)."""
        call = self._stub.Generate(request, timeout=timeout_s)
        try:
            return await framing.assemble_call(call)
        except grpc.aio.AioRpcError as exc:
            raise self.link_error(exc) from exc
        except framing.StreamError as exc:
            raise LinkError(502, f"corrupted or truncated stream: {exc}", "bad_stream") from exc

    def session(self, timeout_s: float) -> grpc.aio.StreamStreamCall:
        """Open one language-model session (a bidirectional stream) through the channel emulator."""
        return self._sessions.Session(timeout=timeout_s)

    def link_error(self, exc: grpc.aio.AioRpcError) -> LinkError:
        http, kind = _STATUS_MAP.get(exc.code(), (502, "upstream_error"))
        retry = None
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry = dict(exc.initial_metadata() or ()).get("retry-after", "1")
        elif exc.code() == grpc.StatusCode.UNAVAILABLE:
            retry = UNAVAILABLE_RETRY_AFTER_S  # a restarting service: `meg up` brings it back in seconds
        details = exc.details() or exc.code().name
        if exc.code() == grpc.StatusCode.UNAVAILABLE and "edge" not in details:
            details = f"channel emulator unreachable at {self.config.target}: {details}"
        return LinkError(http, details, kind, retry)

    async def health(self) -> tuple[bool, str]:
        """(healthy, reason): the channel emulator and, through it, the edge."""
        for service, what in (("", f"channel emulator at {self.config.target}"), (EDGE_SERVICE, "edge (seen from the channel emulator)")):
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
            except grpc.aio.AioRpcError as exc:
                return False, f"{what} unreachable: {exc.code().name}"
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                return False, f"{what} is not serving"
        return True, "ok"

"""The HTTP side of the serving contract: one function runs a :class:`~serving.contract.StreamingApi` for a
REST request, with the bookkeeping every route shares (request id, in-flight gauge, request counter, clean
JSON errors with ``Retry-After``) and cancellation when the client goes away mid-request.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Awaitable, Callable

from starlette.responses import JSONResponse

from serving.contract import CallContext, RequestError, Status, StreamingApi
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)

#: How often a running request checks whether its client is still there (seconds).
DISCONNECT_POLL_S = 0.1


def error_response(status: int, detail: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": f"{max(1.0, retry_after_s):.0f}"} if retry_after_s is not None else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class ClientGone(Exception):
    """The REST client disconnected before the answer was ready."""


async def until_done_or_gone(task: asyncio.Task, disconnected: Callable[[], Awaitable[bool]]) -> Any:
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await disconnected():
            task.cancel()  # cancels the upstream call too: the edge stops this work
            raise ClientGone
    return task.result()


async def respond(api: StreamingApi, body: Any, metrics: MegMetrics, disconnected: Callable[[], Awaitable[bool]],
                  labels: tuple[str, str] | None = None) -> Any:
    """decode_request → run → encode_response for one REST request; returns the single response object or
    a JSON error response."""
    ctx = CallContext(uuid.uuid4().hex[:16])
    token = set_request_id(ctx.request_id)
    codec_label, channel_label = labels or api.metric_labels(body)
    ctx.labels.update(codec=codec_label, channel=channel_label)
    metrics.in_flight.labels(api.service).inc()
    status = "ok"
    try:
        work = await api.decode_request(body, ctx)
        result = await until_done_or_gone(asyncio.ensure_future(api.run(work, ctx)), disconnected)
        frames = [frame async for frame in api.encode_response(result, ctx)]
        return frames[-1]
    except RequestError as exc:
        status = exc.label
        metrics.error(exc.label)
        log.warning("request refused (%d): %s", exc.status.http_status, exc.message)
        return error_response(exc.status.http_status, exc.message, exc.retry_after_s)
    except ClientGone:
        status = "cancelled"
        metrics.error("client_disconnected")
        log.info("client disconnected; cancelled upstream work")
        return error_response(Status.CANCELLED.http_status, "client disconnected")
    finally:
        metrics.in_flight.labels(api.service).dec()
        metrics.requests.labels(api.service, ctx.labels["codec"], ctx.labels["channel"], status).inc()
        reset_request_id(token)

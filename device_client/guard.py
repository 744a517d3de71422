"""The device's front door, as a plain ASGI middleware (no body buffering, no BaseHTTPMiddleware):

* authentication runs on the headers, before one byte of the body is read, so a client without a key
  cannot make the device read (and hold) a large body;
* the body limit counts the bytes as they arrive, whatever the framing (``Content-Length`` or chunked), and
  answers 413 as soon as the limit is passed;
* the request's ``receive`` channel is left untouched otherwise, so handlers still see a client disconnect.

Routes that stay open without a key: ``/``, ``/static/*``, ``/healthz``, ``/metrics``, ``/docs``,
``/openapi.json`` (see README, Security).
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/", "/healthz", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
OPEN_PREFIXES = ("/static/",)


class BodyTooLarge(HTTPException):
    """Raised inside ``receive`` when a body passes the limit. An HTTPException, so that FastAPI's body reader
    lets it through as a 413 instead of turning it into "error parsing the body"."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes", headers={"connection": "close"})


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def key_of(scope: Scope, keys: tuple[str, ...]) -> str | None:
    """The API key the request presents, if it is one of ``keys``."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and any(secrets.compare_digest(token, k) for k in keys):
                return token
    return None


async def send_json(send: Send, status: int, body: dict[str, Any], headers: tuple[tuple[bytes, bytes], ...] = ()
                    ) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class DeviceGuard:
    """Authentication before the body and a streaming body limit around the device app."""

    def __init__(self, app: App, api_keys: tuple[str, ...], max_body_bytes: int, body_timeout_s: float = 30.0
                 ) -> None:
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_keys and not is_open(scope["path"]):
            key = key_of(scope, self.api_keys)
            if key is None:
                await send_json(send, 401, {"detail": "missing or invalid API key: send Authorization: Bearer <key>"},
                                ((b"www-authenticate", b"Bearer"),))
                return
            scope.setdefault("state", {})["api_key"] = key
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                await send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})
                return
        await self._limited(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        seen = 0
        started = False
        body_done = False

        def body_done_now(message: Message) -> None:
            nonlocal body_done
            body_done = body_done or not message.get("more_body", False)

        async def counting_receive() -> Message:
            nonlocal seen
            if not body_done:
                try:
                    message = await asyncio.wait_for(receive(), self.body_timeout_s)
                except asyncio.TimeoutError:
                    raise HTTPException(408, f"request body not received within {self.body_timeout_s:.0f} s",
                                        headers={"connection": "close"}) from None
            else:
                message = await receive()  # after the body: waiting for a disconnect, with no deadline
            if message["type"] == "http.request":
                body_done_now(message)
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"},
                                ((b"connection", b"close"),))

"""Run the device's ASGI app under uvicorn with the limits a public-facing HTTP server needs.

* a header deadline: a connection whose first request's headers have not fully arrived within
  ``header_timeout_s`` is closed (slow-loris sockets would otherwise stay open for ever);
* a connection cap (uvicorn's ``limit_concurrency``: 503 beyond it);
* the body deadline and size limit live in :class:`device_client.guard.DeviceGuard`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class that closes connections whose request headers are late."""

    class HeaderDeadlineH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(timeout_s, self._headers_due)

        def _headers_due(self) -> None:
            # No request cycle yet: the headers are still trickling in (or never come).
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection whose request headers did not arrive within %.0f s", timeout_s)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineH11Protocol


def run_device_server(app: Any, host: str, port: int, *, max_connections: int = 256, header_timeout_s: float = 10.0,
                      log_level: str = "info") -> None:
    """Serve ``app`` until SIGINT/SIGTERM."""
    # log_config=None: uvicorn's records go through this process's handler, in the services' one format.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                            log_config=None, http=header_deadline_protocol(header_timeout_s),
                            limit_concurrency=max_connections, timeout_keep_alive=5)
    uvicorn.Server(config).run()

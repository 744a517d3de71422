"""The split language model's session through the emulated link (``meg.v1.LlmSession/Session``).

The device opens one bidirectional stream per generation; the emulator opens the same stream to the edge and
applies the request's channel to both directions:

* down: each :class:`HiddenStates` message (the prompt's hidden states at prefill, one token's at each decode
  step) goes through :meth:`radio.link.Link.send` like an image payload, paced at the link's symbol rate after
  its propagation delay;
* up: each sampled token goes through :meth:`radio.link.Link.send_control` (a protected block at the uplink's
  own MCS, retransmitted until its CRC passes), also paced, so a token costs a real round trip; its cost comes
  back to the device in the next message's :class:`UplinkReport`.

The session's first message must open it; the emulator feeds its channel estimate to the edge with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, TypeVar

import grpc

from meg.v1 import meg_pb2, meg_pb2_grpc
from radio import ChannelError, ChannelSpec, channel_names
from radio.link import Link, UplinkResult, generator_for
from serving.contract import CallContext, RequestError, Status
from telemetry.metrics import MegMetrics
from wire import framing

log = logging.getLogger(__name__)

SESSION_SERVICE = "meg.v1.LlmSession"
T = TypeVar("T")
MAX_SESSION_S = 3600.0


@dataclass
class _Session:
    spec: ChannelSpec
    generator: object
    uplinks: list[UplinkResult] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)

    def link_now(self) -> ChannelSpec:
        """The link as it is now: an SNR trace runs from the session's opening."""
        return self.spec.at(1e3 * (time.monotonic() - self.opened))


class LlmSessionProxy:
    """Relays sessions between device and edge through :class:`radio.link.Link`."""

    service = "channel"

    def __init__(self, upstream: grpc.aio.Channel, link: Link, metrics: MegMetrics) -> None:
        self.upstream = upstream
        self.link = link
        self.metrics = metrics

    def _open(self, first: meg_pb2.SessionUp, ctx: CallContext) -> _Session:
        if first.WhichOneof("msg") != "open":
            raise RequestError(Status.INVALID, "session: the first message must open the session")
        try:
            spec = ChannelSpec.from_proto(first.open.channel)
            self.link.check(spec)
        except ChannelError as exc:
            raise RequestError(Status.INVALID, str(exc)) from exc
        ctx.request_id = first.open.session_id or ctx.request_id
        ctx.labels.update(codec="-", channel=spec.model if spec.model in channel_names() else "invalid")
        return _Session(spec, generator_for(spec.link.seed))

    async def handle(self, messages: AsyncIterator[meg_pb2.SessionUp], ctx: CallContext
                     ) -> AsyncIterator[meg_pb2.SessionDown]:
        first = await anext(messages, None)
        if first is None:
            return
        session = self._open(first, ctx)
        snr_db, pilots = self.link.probe(session.spec, session.generator)
        if snr_db is not None:
            self.metrics.link_snr_estimate_db.labels(self.service, session.spec.model).set(snr_db)
            first.open.csi.CopyFrom(meg_pb2.ChannelStateInfo(snr_estimate_db=snr_db, pilot_symbols=pilots,
                                                             age_ms=session.spec.link.feedback_delay_ms))
        remaining = ctx.time_remaining()
        stub = meg_pb2_grpc.LlmSessionStub(self.upstream)
        call = stub.Session(timeout=min(remaining or MAX_SESSION_S, MAX_SESSION_S))
        await call.write(first)
        pump = asyncio.create_task(self._uplink(messages, call, session))
        # An uplink that fails (token lost, bad message) ends the downstream loop too.
        pump.add_done_callback(lambda t: call.cancel() if not t.cancelled() and t.exception() else None)
        try:
            async for down in call:
                yield await self._downlink(down, session) if down.WhichOneof("msg") == "hidden" else down
            await pump
        except grpc.aio.AioRpcError as exc:
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception() from None  # type: ignore[misc]
            raise RequestError(Status.from_grpc_name(exc.code().name), exc.details() or exc.code().name,
                               label=f"upstream_{exc.code().name.lower()}") from exc
        finally:
            if not pump.done():
                pump.cancel()
            call.cancel()

    async def _uplink(self, messages: AsyncIterator[meg_pb2.SessionUp], call: grpc.aio.StreamStreamCall,
                      session: _Session) -> None:
        async for message in messages:
            if message.WhichOneof("msg") == "token":
                spec = session.link_now()
                sent = message.token.token_id.to_bytes(4, "little", signed=True)
                up = await _on_link(spec, self.link.send_control, spec, sent, session.generator)
                await _pace(up.airtime_s(spec) + spec.link.delay_ms / 1000.0)
                if up.data is None:
                    raise RequestError(Status.UNAVAILABLE, f"uplink lost: the token at position "
                                       f"{message.token.position} failed its CRC {up.attempts} times")
                session.uplinks.append(up)
            await call.write(message)
        await call.done_writing()

    async def _downlink(self, down: meg_pb2.SessionDown, session: _Session) -> meg_pb2.SessionDown:
        spec, hidden = session.link_now(), down.hidden
        try:
            payload = framing.payload_of_hidden(hidden)
        except framing.StreamError as exc:
            raise RequestError(Status.BAD_STREAM, f"edge sent bad hidden states: {exc}",
                               label="bad_upstream_stream") from exc
        started = time.perf_counter()
        link = await _on_link(spec, self.link.send, spec, payload, session.generator)
        airtime_s = link.airtime_s(spec)
        await _pace(started + spec.link.delay_ms / 1000.0 + airtime_s - time.perf_counter())
        out = framing.hidden_message(link.payload, hidden.position, hidden.rows, hidden.header)
        out.channel.CopyFrom(meg_pb2.ChannelReport(
            model=spec.model, snr_db=spec.snr_db if spec.snr_db is not None else float("inf"),
            bandwidth_hz=spec.link.bandwidth_hz, delay_ms=spec.link.delay_ms, symbols=link.symbols,
            airtime_ms=1e3 * airtime_s, bit_errors=link.bit_errors, bits=link.bits,
            modulation=spec.link.modulation if link.payload.kind == "digital" else "analog",
            channel_ms=1e3 * (time.perf_counter() - started), pilot_symbols=link.pilot_symbols,
            erased=[meg_pb2.ByteRange(start=a, end=b) for a, b in link.erased]))
        if session.uplinks:
            up = session.uplinks.pop(0)
            out.uplink.CopyFrom(meg_pb2.UplinkReport(symbols=up.symbols, attempts=up.attempts,
                                                     airtime_ms=1e3 * up.airtime_s(spec)))
        labels = self.metrics.labels("-", "-", spec.model, spec.snr_db)
        self.metrics.request_symbols.labels(**labels).observe(link.symbols)
        if spec.snr_db is not None:
            self.metrics.link_snr_db.labels(self.service, spec.model).set(spec.snr_db)
        return meg_pb2.SessionDown(hidden=out)


async def _on_link(spec: ChannelSpec, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` (a link transmission) off the event loop, except on a noiseless link: there it only counts
    symbols, and two thread hops per token would be most of a token's time on an ideal link."""
    if spec.noiseless:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _pace(seconds: float) -> None:
    """Hold a message for its airtime and propagation delay (no timer at all when there is none)."""
    if seconds > 0:
        await asyncio.sleep(seconds)

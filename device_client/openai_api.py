"""The device's OpenAI-compatible routes: ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions``, answered by the split language model over the emulated link.

Shapes follow OpenAI's (``chat.completion``, ``chat.completion.chunk``, ``text_completion``), so the official
``openai`` client works unchanged; MEG's figures ride beside them: a ``meg`` object in the answer and in the
final stream chunk, and a ``meg_token`` object in every content chunk (what that token's hidden state cost).

Errors: before the first chunk, the normal HTTP status with a JSON body (422 naming the field, 503 with
Retry-After, 504, 502); once streaming has begun, one ``data: {"error": {...}}`` event, then ``data: [DONE]``.
A client that disconnects cancels its session: the stream to the edge is cancelled and the edge frees the
KV cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

import codec
from codec.base import CodecError
from codec.registry import check_request_params
from codec.sets import LLM_SOURCE
from device_client.llm import CompletionJob, CompletionSummary, LlmDevice, LlmGeneration, TokenEvent
from device_client.llm_schemas import ChatCompletionIn, CompletionCommon, CompletionIn
from device_client.schemas import channel_spec
from serving.contract import RequestError, Status
from serving.http_adapter import ClientGone, error_response, until_done_or_gone
from telemetry.logs import reset_request_id, set_request_id
from telemetry.metrics import MegMetrics

log = logging.getLogger(__name__)


@dataclass
class OpenAiSettings:
    default_codec: str
    default_max_tokens: int
    request_timeout_s: float
    max_in_flight: int


@dataclass
class _Call:
    """One validated request: what to run and how to shape the answer."""

    job: CompletionJob
    chat: bool
    model: str
    created: int
    stream: bool
    include_usage: bool

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.job.request_id


class OpenAiRoutes:
    """Validation, the session run and the OpenAI shapes of both completion endpoints."""

    def __init__(self, device: LlmDevice, generation: LlmGeneration, settings: OpenAiSettings,
                 metrics: MegMetrics) -> None:
        self.device = device
        self.generation = generation
        self.settings = settings
        self.metrics = metrics
        self.in_flight = 0

    # -- validation ------------------------------------------------------------------------------------------
    def prepare(self, body: CompletionCommon, prompt: str, chat: bool) -> _Call:
        if body.model != self.device.model_id:
            raise RequestError(Status.INVALID, f"model: unknown model {body.model!r}; served: {self.device.model_id}")
        if self.in_flight >= self.settings.max_in_flight:
            raise RequestError(Status.OVERLOADED, f"device has {self.in_flight} requests in flight "
                               f"(limit {self.settings.max_in_flight})", retry_after_s=1.0, label="device_overloaded")
        codec_name = body.codec or self.settings.default_codec
        self._check_codec(codec_name, body)
        if body.split_layer is not None and body.split_layer > self.device.num_layers:
            raise RequestError(Status.INVALID, f"split_layer: must be in [1, {self.device.num_layers}], "
                               f"got {body.split_layer}")
        ids = list(self.device.tokenizer(prompt).input_ids)
        room = self.device.context_length - len(ids)
        if room < 1:
            raise RequestError(Status.INVALID, f"{'messages' if chat else 'prompt'}: {len(ids)} tokens fill the "
                               f"context length {self.device.context_length}")
        max_tokens = body.max_tokens if body.max_tokens is not None else min(self.settings.default_max_tokens, room)
        if max_tokens > room:
            raise RequestError(Status.INVALID, f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) "
                               f"exceeds the context length {self.device.context_length}")
        job = CompletionJob(uuid.uuid4().hex[:16], ids, max_tokens, body.temperature or 0.0,
                            body.top_p if body.top_p is not None else 1.0, body.stop_list(), body.seed, codec_name,
                            dict(body.codec_params), channel_spec(body.channel), body.split_layer or 0,
                            self.settings.request_timeout_s, body.ignore_eos)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _Call(job, chat, body.model, int(time.time()), body.stream, include_usage)

    @staticmethod
    def _check_codec(name: str, body: CompletionCommon) -> None:
        names = codec.codec_names(LLM_SOURCE)
        if name not in names:
            raise RequestError(Status.INVALID, f"codec: {name!r} is not a hidden-state codec; known: "
                               f"{', '.join(names)}")
        try:
            check_request_params(name, body.codec_params)
        except CodecError as exc:
            raise RequestError(Status.INVALID, str(exc)) from None
        if codec.registry.codec_kind(name) == "analog":
            for field_name in ("fec", "modulation", "code_rate"):
                if getattr(body.channel, field_name) is not None:
                    raise RequestError(Status.INVALID, f"channel.{field_name}: applies to digital payloads only; "
                                       f"codec {name!r} sends analog symbols")

    # -- answers ---------------------------------------------------------------------------------------------
    async def answer(self, body: CompletionCommon, prompt: str, chat: bool, request: Request) -> Response:
        try:
            call = self.prepare(body, prompt, chat)
        except RequestError as exc:
            return self._refused(exc, body)
        token = set_request_id(call.job.request_id)
        try:
            if call.stream:
                return await self._stream(call, body)
            return await self._whole(call, body, request)
        finally:
            reset_request_id(token)

    def _refused(self, exc: RequestError, body: CompletionCommon, status: str | None = None) -> Response:
        self.metrics.error(exc.label)
        self._count(body, status or exc.label)
        log.warning("completion refused (%d): %s", exc.status.http_status, exc.message)
        return error_response(exc.status.http_status, exc.message, exc.retry_after_s)

    def _count(self, body: CompletionCommon, status: str) -> None:
        name = body.codec or self.settings.default_codec
        label = name if name in codec.codec_names(LLM_SOURCE) else "invalid"
        self.metrics.requests.labels("device", label, body.channel.model, status).inc()

    async def _whole(self, call: _Call, body: CompletionCommon, request: Request) -> Response:
        async def collect() -> tuple[list[TokenEvent], CompletionSummary]:
            events: list[TokenEvent] = []
            async for item in self.generation.stream(call.job):
                if isinstance(item, TokenEvent):
                    events.append(item)
                else:
                    return events, item
            raise RequestError(Status.BAD_STREAM, "the session ended without a summary")

        self.in_flight += 1
        self.metrics.in_flight.labels("device").inc()
        try:
            events, summary = await until_done_or_gone(asyncio.ensure_future(collect()), request.is_disconnected)
        except RequestError as exc:
            return self._refused(exc, body)
        except ClientGone:
            self.metrics.error("client_disconnected")
            self._count(body, "cancelled")
            return error_response(Status.CANCELLED.http_status, "client disconnected")
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.labels("device").dec()
        self._count(body, "ok")
        return JSONResponse(self._whole_body(call, events, summary))

    def _whole_body(self, call: _Call, events: list[TokenEvent], summary: CompletionSummary) -> dict[str, Any]:
        text = summary.text.lstrip() if call.chat else summary.text
        choice: dict[str, Any] = {"index": 0, "finish_reason": summary.finish_reason, "logprobs": None}
        if call.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        meg = {**summary.meg, "tokens": [{"index": e.index, "text": e.text, "bits": e.bits, "symbols": e.symbols,
                                          "latency_ms": e.latency_ms} for e in events]}
        return {"id": call.id, "object": "chat.completion" if call.chat else "text_completion",
                "created": call.created, "model": call.model, "choices": [choice], "usage": _usage(summary),
                "meg": meg}

    async def _stream(self, call: _Call, body: CompletionCommon) -> Response:
        """Start the session; refuse with an HTTP status until the first token, then stream events."""
        events = self.generation.stream(call.job)
        self.in_flight += 1
        self.metrics.in_flight.labels("device").inc()
        try:
            first = await anext(events)
        except (RequestError, StopAsyncIteration) as exc:
            self.in_flight -= 1
            self.metrics.in_flight.labels("device").dec()
            await events.aclose()
            error = exc if isinstance(exc, RequestError) else RequestError(Status.BAD_STREAM, "empty session")
            return self._refused(error, body)
        return StreamingResponse(self._sse(call, body, first, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, call: _Call, body: CompletionCommon, first: TokenEvent | CompletionSummary,
                   events: AsyncIterator[TokenEvent | CompletionSummary]) -> AsyncIterator[bytes]:
        status = "cancelled"  # unless the stream ends one way or the other below
        shaper = _ChunkShaper(call)
        try:
            item: TokenEvent | CompletionSummary | None = first
            while item is not None:
                for chunk in shaper.chunks(item):
                    yield _event(chunk)
                item = await anext(events, None)
            status = "ok"
        except RequestError as exc:
            status = exc.label
            self.metrics.error(exc.label)
            log.warning("completion failed mid-stream (%d): %s", exc.status.http_status, exc.message)
            yield _event({"error": {"message": exc.message, "type": exc.label, "code": exc.status.http_status}})
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.labels("device").dec()
            self._count(body, status)
            await events.aclose()  # on a disconnect: cancels the session, the edge frees its cache
        yield b"data: [DONE]\n\n"


class _ChunkShaper:
    """OpenAI stream chunks of one answer: a role chunk first (chat), content chunks, the finish chunk."""

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.started = False
        self.text = ""

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        call = self.call
        return {"id": call.id, "object": "chat.completion.chunk" if call.chat else "text_completion",
                "created": call.created, "model": call.model, "choices": [choice] if choice else [], **extra}

    def chunks(self, item: TokenEvent | CompletionSummary) -> list[dict[str, Any]]:
        if isinstance(item, TokenEvent):
            text = item.text
            if self.call.chat and not self.text:
                text = text.lstrip()  # the template ends at "Answer:"; the answer's leading space is not content
            self.text += text
            token = {k: v for k, v in asdict(item).items() if k in ("index", "bits", "symbols", "latency_ms")}
            delta: dict[str, Any] = {"content": text}
            if self.call.chat and not self.started:
                delta["role"] = "assistant"
            self.started = True
            return [self._chunk(self._choice(delta, None), meg_token=token)]
        out = [self._chunk(self._choice({}, item.finish_reason), meg=item.meg)]
        if self.call.include_usage:
            out.append(self._chunk({}, usage=_usage(item)))
        return out

    def _choice(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if self.call.chat:
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "text": delta.get("content", ""), "finish_reason": finish, "logprobs": None}


def _usage(summary: CompletionSummary) -> dict[str, int]:
    return {"prompt_tokens": summary.prompt_tokens, "completion_tokens": summary.completion_tokens,
            "total_tokens": summary.prompt_tokens + summary.completion_tokens}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def chat_prompt(device: LlmDevice, body: ChatCompletionIn) -> str:
    """The prompt text of a chat: the model folder's own chat template over the messages."""
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return str(device.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def add_openai_routes(app: FastAPI, routes: OpenAiRoutes) -> None:
    device = routes.device

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": device.model_id, "object": "model", "created": 0,
                                            "owned_by": "meg", "meg": device.describe()}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionIn, request: Request) -> Response:
        return await routes.answer(body, chat_prompt(device, body), True, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionIn, request: Request) -> Response:
        return await routes.answer(body, body.prompt_text(), False, request)

"""The device's OpenAI stream shapes and its refusal of hidden states coded with another codec set, in process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import AsyncIterator

import pytest

from device_client.llm import CompletionJob, CompletionSummary, LlmGeneration, TokenEvent
from device_client.llm_schemas import CompletionIn
from device_client.openai_api import OpenAiRoutes, OpenAiSettings, _Call
from meg.v1 import meg_pb2
from radio import ChannelSpec
from serving.contract import RequestError, Status
from telemetry.metrics import MegMetrics

LLM_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes_llm_v1"


def job() -> CompletionJob:
    return CompletionJob("r1", [1, 2, 3], 4, 0.0, 1.0, [], None, "raw-fp16", {}, ChannelSpec.from_mapping({}), 0, 30.0)


def routes() -> OpenAiRoutes:
    device = SimpleNamespace(model_id="shapes-llm-v1")
    return OpenAiRoutes(device, None, OpenAiSettings("raw-fp16", 8, 30.0, 4), MegMetrics("device"))  # type: ignore[arg-type]


def events(stream: list[bytes]) -> list[object]:
    text = b"".join(stream).decode()
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e.removeprefix("data: ")) for e in text.strip().split("\n\n")[:-1]]


async def collect(agen: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in agen]


def test_a_failure_after_the_first_chunk_is_one_error_event_then_done() -> None:
    async def failing() -> AsyncIterator[TokenEvent | CompletionSummary]:
        yield TokenEvent(1, 7, "ue", 2048, 1000, 1.0, 3.0)
        raise RequestError(Status.UNAVAILABLE, "edge unreachable", label="unavailable")

    r = routes()
    call = _Call(job(), chat=True, model="shapes-llm-v1", created=0, stream=True, include_usage=False)
    body = CompletionIn(model="shapes-llm-v1", prompt="x")
    first = TokenEvent(0, 5, " bl", 4096, 2000, 2.0, 10.0)
    r.in_flight = 1
    out = events(asyncio.run(collect(r._sse(call, body, first, failing()))))
    assert [o["choices"][0]["delta"]["content"] for o in out[:2]] == ["bl", "ue"]  # type: ignore[index]
    assert out[0]["meg_token"] == {"index": 0, "bits": 4096, "symbols": 2000, "latency_ms": 10.0}  # type: ignore[index]
    assert out[-1] == {"error": {"message": "edge unreachable", "type": "unavailable", "code": 503}}
    assert r.in_flight == 0


def test_the_last_chunks_carry_meg_and_usage() -> None:
    async def rest() -> AsyncIterator[TokenEvent | CompletionSummary]:
        yield CompletionSummary("stop", 3, 1, " blue", {"bits_sent": 4096, "ttft_ms": 10.0})

    r = routes()
    call = _Call(job(), chat=False, model="shapes-llm-v1", created=0, stream=True, include_usage=True)
    r.in_flight = 1
    out = events(asyncio.run(collect(r._sse(call, CompletionIn(model="shapes-llm-v1", prompt="x"),
                                            TokenEvent(0, 5, " blue", 4096, 2000, 2.0, 10.0), rest()))))
    assert out[0]["object"] == "text_completion" and out[0]["choices"][0]["text"] == " blue"  # type: ignore[index]
    assert out[1]["choices"][0]["finish_reason"] == "stop" and out[1]["meg"]["bits_sent"] == 4096  # type: ignore[index]
    assert out[2]["choices"] == [] and out[2]["usage"]["total_tokens"] == 4  # type: ignore[index]


def test_hidden_states_from_another_codec_set_are_refused() -> None:
    device = SimpleNamespace(codec_set=lambda k: (LLM_DIR / "codecs" / f"llm-hidden-k{k}", ("shapes-llm-v1/llm-hidden-k2", "abc")))
    generation = LlmGeneration(device, None, MegMetrics("device"))  # type: ignore[arg-type]
    down = meg_pb2.HiddenStates(header=meg_pb2.StreamHeader(codec_set="other/llm-hidden-k2", codec_set_hash="def"))
    with pytest.raises(RequestError) as err:
        generation._decode(down, job(), 2, {})
    assert err.value.status is Status.BAD_STREAM and "codec set mismatch" in err.value.message

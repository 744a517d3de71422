"""The edge's LLM sessions in process: admission bounds, positions, budgets, idle timeout, freeing the cache,
and decode steps of several sessions batched into one call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

import codec
from edge_server.llm import LlmEdgeConfig, LlmEdgeStepModel, LlmSessionApi, kv_bytes_per_row
from meg.v1 import meg_pb2
from models.llm.loader import llm_model_id, load_llm
from models.llm.split import DeviceHalf, sample
from serving.contract import CallContext, RequestError, Status
from serving.scheduler import StepScheduler
from telemetry.metrics import MegMetrics
from wire import framing

LLM_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes_llm_v1"
PROMPT = "Scene: a red circle, a blue square.\nQuestion: what colour is the square?\nAnswer:"


@pytest.fixture(scope="module")
def llm():  # type: ignore[no-untyped-def]
    return load_llm(LLM_DIR)


def make_api(llm, **overrides: object) -> LlmSessionApi:  # type: ignore[no-untyped-def]
    config = LlmEdgeConfig(llm_dir=LLM_DIR, **overrides)  # type: ignore[arg-type]
    metrics = MegMetrics("edge")
    scheduler = StepScheduler(LlmEdgeStepModel(), config.scheduler(), metrics, cpu=True, name="test-llm")
    return LlmSessionApi(llm, llm_model_id(LLM_DIR), config, scheduler, metrics)


@pytest.fixture()
def api(llm) -> Iterator[LlmSessionApi]:  # type: ignore[no-untyped-def]
    a = make_api(llm)
    yield a
    a.scheduler.stop(drain=False)


def opening(llm, max_tokens: int = 8, **fields: object) -> meg_pb2.SessionUp:  # type: ignore[no-untyped-def]
    ids = llm.tokenizer(PROMPT).input_ids
    return meg_pb2.SessionUp(open=meg_pb2.SessionOpen(session_id=fields.pop("session_id", "s1"), prompt_ids=ids,
                                                      codec=str(fields.pop("codec", "raw-fp32")),
                                                      max_tokens=max_tokens, **fields))


class Device:
    """The device's side of a session in the test: decodes hidden states and samples greedily."""

    def __init__(self, llm, k: int) -> None:  # type: ignore[no-untyped-def]
        self.half = DeviceHalf(llm.model, k)

    def token_for(self, hidden: meg_pb2.HiddenStates) -> int:
        payload = framing.payload_of_hidden(hidden)
        rows = codec.build_codec(hidden.header.codec_id, dict(hidden.header.codec_params)).decode(payload)["hidden"]
        return int(sample(self.half.prefill(rows, int(hidden.position))[0]))


async def run_session(api: LlmSessionApi, llm, steps: int, first: meg_pb2.SessionUp) -> list[int]:  # type: ignore[no-untyped-def]
    device: Device | None = None
    out: list[int] = []
    inbox: asyncio.Queue[meg_pb2.SessionUp | None] = asyncio.Queue()
    await inbox.put(first)

    async def messages() -> AsyncIterator[meg_pb2.SessionUp]:
        while (m := await inbox.get()) is not None:
            yield m

    position = len(first.open.prompt_ids)
    async for down in api.handle(messages(), CallContext("test")):
        if down.WhichOneof("msg") == "accepted":
            device = Device(llm, down.accepted.split_layer)
            continue
        assert device is not None
        token = device.token_for(down.hidden)
        out.append(token)
        if len(out) == steps:
            await inbox.put(meg_pb2.SessionUp(close=meg_pb2.SessionClose(reason="done")))
            await inbox.put(None)
        else:
            await inbox.put(meg_pb2.SessionUp(token=meg_pb2.TokenUp(position=position, token_id=token)))
            position += 1
    return out


def test_a_session_reproduces_greedy_generation_and_frees_its_cache(api: LlmSessionApi, llm) -> None:  # type: ignore[no-untyped-def]
    ids = llm.tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = llm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
    got = asyncio.run(run_session(api, llm, len(expected), opening(llm)))
    assert got == expected
    assert api.table.sessions == {}
    assert api.metrics.llm_sessions.labels("edge")._value.get() == 0


def test_concurrent_sessions_share_decode_steps(api: LlmSessionApi, llm) -> None:  # type: ignore[no-untyped-def]
    async def many() -> list[list[int]]:
        return await asyncio.gather(*(run_session(api, llm, 6, opening(llm, session_id=f"s{i}"))
                                      for i in range(4)))

    results = asyncio.run(many())
    assert all(r == results[0] for r in results)
    # Some step ran more than one session's row in one call.
    samples = {s.name: s.value for m in api.metrics.registry.collect() if m.name == "meg_batch_size"
               for s in m.samples}
    assert samples["meg_batch_size_sum"] > samples["meg_batch_size_count"]


@pytest.mark.parametrize("fields, needle", [
    ({"split_layer": 9}, "split_layer"),
    ({"codec": "hyperprior"}, "codec"),
    ({"codec": "raw-fp16", "codec_params": {"side_info": "x"}}, "codec_params"),
])
def test_bad_opens_name_the_field(api: LlmSessionApi, llm, fields: dict, needle: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError) as err:
        asyncio.run(run_session(api, llm, 1, opening(llm, **fields)))
    assert err.value.status is Status.INVALID and err.value.message.startswith(needle)
    assert api.table.sessions == {}


def test_prompt_plus_max_tokens_over_the_context_names_max_tokens(api: LlmSessionApi, llm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError, match="^max_tokens"):
        asyncio.run(run_session(api, llm, 1, opening(llm, max_tokens=api.context_length)))


def test_a_wrong_position_is_refused_and_the_session_freed(api: LlmSessionApi, llm) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        inbox: asyncio.Queue[meg_pb2.SessionUp] = asyncio.Queue()
        await inbox.put(opening(llm))
        await inbox.put(meg_pb2.SessionUp(token=meg_pb2.TokenUp(position=999, token_id=5)))

        async def messages() -> AsyncIterator[meg_pb2.SessionUp]:
            while True:
                yield await inbox.get()

        async for _ in api.handle(messages(), CallContext("t")):
            pass

    with pytest.raises(RequestError, match="^token.position"):
        asyncio.run(go())
    assert api.table.sessions == {}


def test_full_tables_refuse_with_retry_after(llm) -> None:  # type: ignore[no-untyped-def]
    per_session = (len(llm.tokenizer(PROMPT).input_ids) + 8) * kv_bytes_per_row(llm, 2)
    for overrides in ({"llm_max_sessions": 1}, {"llm_max_kv_mb": 1.5 * per_session / 2**20}):
        api = make_api(llm, **overrides)
        try:
            async def two() -> None:
                blocker: asyncio.Queue[meg_pb2.SessionUp | None] = asyncio.Queue()
                await blocker.put(opening(llm, session_id="a"))

                async def held() -> AsyncIterator[meg_pb2.SessionUp]:
                    while (m := await blocker.get()) is not None:
                        yield m

                first = api.handle(held(), CallContext("a"))
                await anext(first)  # accepted: session "a" holds its reservation
                try:
                    await run_session(api, llm, 1, opening(llm, session_id="b"))
                finally:
                    await first.aclose()

            with pytest.raises(RequestError) as err:
                asyncio.run(two())
            assert err.value.status is Status.OVERLOADED and err.value.retry_after_s is not None
            assert "edge is full" in err.value.message
            assert api.table.sessions == {}
        finally:
            api.scheduler.stop(drain=False)


def test_an_idle_session_is_freed(llm) -> None:  # type: ignore[no-untyped-def]
    api = make_api(llm, llm_idle_s=0.2)
    try:
        async def go() -> None:
            async def silent() -> AsyncIterator[meg_pb2.SessionUp]:
                yield opening(llm)
                await asyncio.sleep(3600)
                yield opening(llm)  # never reached

            async for _ in api.handle(silent(), CallContext("t")):
                pass

        with pytest.raises(RequestError) as err:
            asyncio.run(go())
        assert err.value.status is Status.DEADLINE and "idle" in err.value.message
        assert api.table.sessions == {}
    finally:
        api.scheduler.stop(drain=False)

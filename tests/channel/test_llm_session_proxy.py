"""The channel emulator relays LLM sessions through the link, both ways (a stand-in edge on loopback)."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import numpy as np
import pytest

from channel_sim.service import ChannelServiceConfig, serve
from conftest import free_port
from meg.v1 import meg_pb2, meg_pb2_grpc
from wire import framing
from wire.payload import EncodedPayload, TensorInfo

HIDDEN = 8


class StandInEdge(meg_pb2_grpc.LlmSessionServicer):
    """Answers an open with the prompt's 'hidden states' and each token with one row holding its id."""

    def __init__(self) -> None:
        self.tokens: list[tuple[int, int]] = []
        self.csi: list[float] = []

    async def Session(self, requests: AsyncIterator[meg_pb2.SessionUp], context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[meg_pb2.SessionDown]:
        async for message in requests:
            kind = message.WhichOneof("msg")
            if kind == "open":
                self.csi.append(message.open.csi.snr_estimate_db)
                yield meg_pb2.SessionDown(accepted=meg_pb2.SessionAccepted(session_id=message.open.session_id,
                                                                           split_layer=1, num_layers=2))
                rows = len(message.open.prompt_ids)
                values = np.arange(rows * HIDDEN, dtype=np.float32).reshape(rows, HIDDEN)
                yield meg_pb2.SessionDown(hidden=self._hidden(values.tobytes(), 0, rows))
            elif kind == "token":
                self.tokens.append((message.token.position, message.token.token_id))
                data = np.full(HIDDEN, message.token.token_id, dtype=np.float32).tobytes()
                yield meg_pb2.SessionDown(hidden=self._hidden(data, message.token.position, 1))
            else:
                return

    @staticmethod
    def _hidden(data: bytes, position: int, rows: int) -> meg_pb2.HiddenStates:
        payload = EncodedPayload("digital", [TensorInfo("hidden", (1, rows, HIDDEN))], {"codec": "raw"}, data=data)
        return framing.hidden_message(payload, position, rows, meg_pb2.StreamHeader(model_id="stand-in"))


async def _session(channel: dict, tokens: list[int], first: meg_pb2.SessionUp | None = None
                   ) -> tuple[list[meg_pb2.SessionDown], StandInEdge]:
    edge_port, channel_port = free_port(), free_port()
    edge = grpc.aio.server()
    stand_in = StandInEdge()
    meg_pb2_grpc.add_LlmSessionServicer_to_server(stand_in, edge)
    edge.add_insecure_port(f"127.0.0.1:{edge_port}")
    await edge.start()
    ready = asyncio.Event()
    emulator = asyncio.create_task(serve(ChannelServiceConfig(port=channel_port, metrics_port=0,
                                                              edge=f"127.0.0.1:{edge_port}"), ready))
    await asyncio.wait_for(ready.wait(), 60)
    spec = meg_pb2.ChannelSpec(model=channel["model"], params={k: v for k, v in channel.items() if k != "model"},
                               fec="ldpc", seed=3)
    opening = first or meg_pb2.SessionUp(open=meg_pb2.SessionOpen(session_id="s1", prompt_ids=[5, 6, 7],
                                                                  channel=spec, max_tokens=8))
    received: list[meg_pb2.SessionDown] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{channel_port}") as ch:
            call = meg_pb2_grpc.LlmSessionStub(ch).Session(timeout=60)
            await call.write(opening)
            position = 3
            async for down in call:
                received.append(down)
                if down.WhichOneof("msg") == "hidden":
                    if not tokens:
                        await call.write(meg_pb2.SessionUp(close=meg_pb2.SessionClose(reason="done")))
                        await call.done_writing()
                        continue
                    await call.write(meg_pb2.SessionUp(token=meg_pb2.TokenUp(position=position,
                                                                             token_id=tokens.pop(0))))
                    position += 1
    finally:
        emulator.cancel()
        await edge.stop(0)
    return received, stand_in


def test_session_crosses_the_link_both_ways() -> None:
    received, edge = asyncio.run(_session({"model": "awgn", "snr_db": 15.0}, [11, 22, 33]))
    kinds = [d.WhichOneof("msg") for d in received]
    assert kinds == ["accepted", "hidden", "hidden", "hidden", "hidden"]
    assert edge.tokens == [(3, 11), (4, 22), (5, 33)]          # every token arrived intact, in order
    assert edge.csi and abs(edge.csi[0] - 15.0) < 1e-6          # perfect CSI: the configured SNR
    hidden = [d.hidden for d in received[1:]]
    assert [h.position for h in hidden] == [0, 3, 4, 5] and [h.rows for h in hidden] == [3, 1, 1, 1]
    for h, token in zip(hidden[1:], (11, 22, 33)):
        payload = framing.payload_of_hidden(h)                  # CRC and sizes check out after the link
        assert np.frombuffer(payload.data, np.float32).tolist() == [float(token)] * HIDDEN
        assert h.channel.symbols > 0 and h.channel.airtime_ms > 0 and h.channel.model == "awgn"
        assert h.uplink.symbols == 140 * h.uplink.attempts and h.uplink.attempts >= 1
    assert not hidden[0].HasField("uplink")                     # the prefill answers the open, not a token


@pytest.mark.parametrize("first, needle", [
    (meg_pb2.SessionUp(token=meg_pb2.TokenUp(position=0, token_id=1)), "first message must open"),
    (meg_pb2.SessionUp(open=meg_pb2.SessionOpen(channel=meg_pb2.ChannelSpec(model="awgn"))), "channel.snr_db"),
])
def test_bad_sessions_get_invalid_argument(first: meg_pb2.SessionUp, needle: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_session({"model": "awgn", "snr_db": 10.0}, [], first))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in info.value.details()

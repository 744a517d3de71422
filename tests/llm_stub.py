"""A stand-in device that speaks the LLM REST contract with scripted answers, served in-process.

It lets the dashboard's LLM panel and ``meg chat`` be tested on what only a script can produce on demand:
a slow stream (tokens arriving one by one), an error after the stream began, an HTTP error before it. It
serves the real dashboard files, and enough of the image API for the page to load. The real services are
tested against the same clients in the testbed tests; this stub only mirrors the contract:

- ``GET /v1/models``, ``GET /v1/codecs?source=llm-hidden``, ``GET /v1/channels``
- ``POST /v1/chat/completions`` with ``stream: true``: ``chat.completion.chunk`` events whose content chunks
  carry ``meg_token``, a final chunk with ``finish_reason`` and ``meg``, a usage chunk when asked, ``[DONE]``;
  an error mid-stream is ``{"error": {"message", "type", "code"}}`` then ``[DONE]``
  (device_client/openai_api.py is the real thing).

Prompts that script a failure: one holding ``FAIL-MIDSTREAM`` streams one token, then an error event;
``FAIL-BEFORE`` is refused before the stream (422 with a ``detail``, as the device refuses).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# At module level: FastAPI resolves the routes' annotations (Request) in this module's namespace.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

MODEL_ID = "shapes-llm-v1"
BITS_PER_TOKEN = 2048      # one fp16 row of 128 hidden values
SYMBOLS_PER_TOKEN = 1024   # QPSK: two bits a channel use
TOKEN_DELAY_S = 0.15       # slow enough that a test sees the answer grow
STATIC_DIR = Path(__file__).resolve().parent.parent / "device_client" / "static"
CHANNELS = [
    {"name": "ideal", "description": "no impairment", "parameters": ["bandwidth_hz", "delay_ms"]},
    {"name": "awgn", "description": "additive white Gaussian noise",
     "parameters": ["snr_db", "bandwidth_hz", "delay_ms", "modulation", "fec", "code_rate"]},
]
LLM_CODECS = [
    {"name": "raw-fp16", "kind": "digital", "description": "hidden states as float16"},
    {"name": "analog", "kind": "analog", "description": "hidden states as analog symbols"},
]


def scripted_answer(prompt: str) -> list[str]:
    """The answer tokens to ``what colour is the <shape>?`` about the scene, split in two so the stream has
    several tokens; "unknown" for any other question."""
    asked = re.search(r"what colou?r is the (\w+)\?", prompt)
    scene = re.search(r"Scene:(.*)", prompt)
    if asked and scene:
        for colour, shape in re.findall(r"a (\w+) (\w+)", scene.group(1)):
            if shape == asked.group(1):
                return [" " + colour[:2], colour[2:]]
    return [" unknown"]


@dataclass
class StubDevice:
    """The stub's app and what it has been asked (``requests``: the JSON bodies of chat/completions)."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> Any:
        app = FastAPI()

        @app.get("/")
        async def index() -> FileResponse:
            return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

        @app.get("/static/{name}")
        async def static(name: str) -> FileResponse:
            return FileResponse(STATIC_DIR / Path(name).name)

        @app.get("/healthz")
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "reason": ""}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse("")

        @app.get("/v1/history")
        async def history() -> dict[str, Any]:
            return {"requests": []}

        @app.get("/v1/channels")
        async def channels() -> dict[str, Any]:
            return {"channels": CHANNELS}

        @app.get("/v1/codecs")
        async def codecs(source: str = "image") -> dict[str, Any]:
            if source == "llm-hidden":
                return {"codecs": LLM_CODECS, "default": "raw-fp16"}
            return {"codecs": [{"name": "raw-fp16", "kind": "digital", "description": "latents as float16"}],
                    "default": "raw-fp16"}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{
                "id": MODEL_ID, "object": "model", "created": 1700000000, "owned_by": "meg",
                "meg": {"num_layers": 4, "hidden_size": 128, "default_split_layer": 2, "context_length": 256}}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
            if "FAIL-BEFORE" in prompt:
                return JSONResponse({"detail": "split_layer: must be in [1, 4]"}, status_code=422)
            return StreamingResponse(self._events(body, prompt), media_type="text/event-stream")

        return app

    async def _events(self, body: dict[str, Any], prompt: str) -> AsyncIterator[str]:
        started = time.monotonic()
        last = started
        tokens = scripted_answer(prompt)
        base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": MODEL_ID}
        yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}]})
        per_token = []
        for index, text in enumerate(tokens):
            await asyncio.sleep(TOKEN_DELAY_S)
            now = time.monotonic()
            figures = {"index": index, "bits": BITS_PER_TOKEN, "symbols": SYMBOLS_PER_TOKEN,
                       "latency_ms": round(1000 * (now - last), 3)}
            last = now
            per_token.append({**figures, "text": text})
            yield _sse({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                        "meg_token": figures})
            if "FAIL-MIDSTREAM" in prompt:
                yield _sse({"error": {"message": "the channel emulator went away", "type": "upstream_unavailable",
                                      "code": 503}})
                yield "data: [DONE]\n\n"
                return
        latencies = [t["latency_ms"] for t in per_token]
        meg = {"bits_sent": BITS_PER_TOKEN * len(tokens), "symbols_sent": SYMBOLS_PER_TOKEN * len(tokens),
               "airtime_ms": 0.5 * len(tokens), "ttft_ms": latencies[0],
               "tpot_ms": sum(latencies[1:]) / max(len(latencies) - 1, 1),
               "split_layer": body.get("split_layer", 2), "codec": body.get("codec", "raw-fp16"),
               "channel": body.get("channel", {"model": "ideal"}), "tokens": per_token}
        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "meg": meg})
        if (body.get("stream_options") or {}).get("include_usage"):
            yield _sse({**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": len(tokens),
                                                          "total_tokens": 12 + len(tokens)}})
        yield "data: [DONE]\n\n"


def _sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event)}\n\n"


@contextmanager
def serve_stub(port: int) -> Iterator[StubDevice]:
    """The stub on 127.0.0.1:``port`` in a thread, for the duration of the block."""
    import uvicorn

    stub = StubDevice()
    server = uvicorn.Server(uvicorn.Config(stub.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the LLM stub device did not start")
        time.sleep(0.05)
    try:
        yield stub
    finally:
        server.should_exit = True
        thread.join(timeout=20)

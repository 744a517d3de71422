"""The split language model through the real testbed (edge, channel emulator, device on loopback): the
identity of a lossless split, the official ``openai`` client against the device, errors, and freeing a
session when its client goes away."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from models.llm.loader import load_llm
from models.llm.tasks import heldout_prompts

LLM_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes_llm_v1"
MODEL = "shapes-llm-v1"
SCENE = "Scene: a red circle, a blue square.\nQuestion: what colour is the square?"


def edge_sessions(bed) -> float:  # type: ignore[no-untyped-def]
    text = httpx.get(f"http://127.0.0.1:{bed.edge_metrics_port}/metrics", timeout=5).text
    match = re.search(r'^meg_llm_sessions\{service="edge"\} ([0-9.]+)$', text, re.M)
    assert match, "the edge exports meg_llm_sessions"
    return float(match.group(1))


def monolithic_tokens(llm, prompt: str, max_new_tokens: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy new token ids of the whole model in one process, up to and including its first end token."""
    ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = llm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_lossless_split_matches_the_monolithic_model_on_100_heldout_prompts(testbed) -> None:  # type: ignore[no-untyped-def]
    llm = load_llm(LLM_DIR)
    mismatches = []
    with httpx.Client(base_url=testbed.url, timeout=60) as client:
        for qa in heldout_prompts(per_kind=25):
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": qa.prompt, "max_tokens": 6,
                                                     "codec": "raw-fp32", "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            want = monolithic_tokens(llm, qa.prompt, 6)
            # Token for token: as many tokens (the end token included), and the same text before it.
            same = (body["usage"]["completion_tokens"] == len(want)
                    and body["choices"][0]["text"] == llm.tokenizer.decode(want, skip_special_tokens=True).split("\n")[0])
            if not same:
                mismatches.append((qa.prompt, want, body["choices"][0]["text"]))
    assert not mismatches, mismatches[:3]


def test_the_openai_client_works_unchanged(testbed) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=f"{testbed.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == [MODEL]
    meg_fields = {"codec": "raw-fp16", "channel": {"model": "awgn", "snr_db": 20.0}, "split_layer": 1}

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SCENE}],
                                          max_tokens=4, extra_body=meg_fields)
    assert chat.choices[0].message.content == "blue"
    assert chat.usage is not None and chat.usage.prompt_tokens > 10 and chat.usage.completion_tokens >= 1
    meg = chat.model_extra["meg"]
    assert meg["split_layer"] == 1 and meg["codec"] == "raw-fp16" and meg["channel"]["model"] == "awgn"
    assert meg["bits_sent"] > 0 and meg["symbols_sent"] > 0 and meg["airtime_ms"] > 0 and meg["ttft_ms"] > 0

    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SCENE}],
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body=meg_fields)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "blue"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1].model_extra["meg"]["tpot_ms"] >= 0
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1

    prompt = SCENE + "\nAnswer:"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"codec": "raw-fp32"})
    assert done.choices[0].text == " blue" and done.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, stream=True) if c.choices)
    assert streamed == " blue"

    with pytest.raises(openai.UnprocessableEntityError, match="n: only n = 1"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": SCENE}], n=2)


@pytest.mark.parametrize("extra, field", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"model": "gpt-4"}, "model"), ({"max_tokens": 100000}, "max_tokens"), ({"codec": "hyperprior"}, "codec"),
    ({"split_layer": 99}, "split_layer"), ({"channel": {"model": "awgn"}}, "channel.snr_db"),
])
def test_refusals_name_the_field(testbed, extra: dict, field: str) -> None:  # type: ignore[no-untyped-def]
    body = {"model": MODEL, "messages": [{"role": "user", "content": SCENE}], **extra}
    r = httpx.post(f"{testbed.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(field), r.json()


def test_codecs_are_listed_per_feature_source(testbed) -> None:  # type: ignore[no-untyped-def]
    hidden = httpx.get(f"{testbed.url}/v1/codecs", params={"source": "llm-hidden"}, timeout=10).json()
    names = {c["name"] for c in hidden["codecs"]}
    assert {"raw-fp32", "raw-fp16"} <= names and "hyperprior" not in names
    sources = httpx.get(f"{testbed.url}/v1/sources", timeout=10).json()["sources"]
    assert {s["name"] for s in sources} == {"image", "llm-hidden"}
    assert httpx.get(f"{testbed.url}/v1/codecs", params={"source": "audio"}, timeout=10).status_code == 422


def test_a_client_that_goes_away_frees_its_session_on_the_edge(testbed) -> None:  # type: ignore[no-untyped-def]
    # Sampling at a high temperature rarely ends the answer, and 50 ms each way keeps the session open.
    body = {"model": MODEL, "prompt": "Scene:", "max_tokens": 200, "temperature": 2.0, "seed": 3, "stream": True,
            "channel": {"model": "ideal", "delay_ms": 50.0}}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{testbed.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert edge_sessions(testbed) == 1
        # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 15.0  # liveness bound, not a speed claim
    while edge_sessions(testbed) != 0:
        assert time.monotonic() < deadline, "the edge still holds the session"
        time.sleep(0.05)

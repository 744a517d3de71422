"""`meg chat`: the SSE parsing, the request it sends, what it prints, and its errors; first against the
scripted stub device (tests/llm_stub.py: slow streams and failures on demand), then against the real testbed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Iterator

import pytest

from conftest import REPO, Testbed, free_port
from llm_stub import BITS_PER_TOKEN, MODEL_ID, StubDevice, serve_stub
from meg_cli import main as cli
from meg_cli.chat import ChatStream, StreamError, http_error_detail, iter_sse_data

QUESTION = "Scene: a red circle, a blue square.\nQuestion: what colour is the square?"


# ------------------------------------------------------------------------------------------- parsing


def test_sse_events_are_split_at_blank_lines_and_joined_across_data_lines() -> None:
    lines = [": keep-alive\n", "data: {\"a\": 1}\n", "\n",
             "event: message\r\n", "id: 7\r\n", "data:{\"b\":\r\n", "data:  2}\r\n", "\r\n",
             "\n", "\n",                      # blank lines with no event pending deliver nothing
             "retry: 100\n", "data: [DONE]"]  # the last event has no blank line after it: still delivered
    assert list(iter_sse_data(lines)) == ['{"a": 1}', '{"b":\n 2}', "[DONE]"]


def test_a_chat_stream_collects_text_token_figures_summary_and_usage() -> None:
    stream = ChatStream()
    assert stream.feed('{"choices": [{"delta": {"role": "assistant", "content": ""}}]}') == ""
    assert stream.feed('{"choices": [{"delta": {"content": " bl"}}], '
                       '"meg_token": {"index": 0, "bits": 2048, "symbols": 1024, "latency_ms": 9.5}}') == " bl"
    assert stream.feed('{"choices": [{"delta": {"content": "ue"}}], '
                       '"meg_token": {"index": 1, "bits": 2048, "symbols": 1024, "latency_ms": 3.0}}') == "ue"
    stream.feed('{"choices": [{"delta": {}, "finish_reason": "stop"}], "meg": {"bits_sent": 4096}}')
    stream.feed('{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}')
    assert not stream.done
    stream.feed("[DONE]")
    assert stream.done and stream.text == " blue" and stream.finish_reason == "stop"
    assert [t["text"] for t in stream.tokens] == [" bl", "ue"] and stream.tokens[0]["latency_ms"] == 9.5
    assert stream.meg == {"bits_sent": 4096} and stream.usage["completion_tokens"] == 2


@pytest.mark.parametrize(("data", "message"), [
    ('{"error": {"message": "channel down", "type": "server_error", "code": "unavailable"}}',
     "channel down (server_error, unavailable)"),
    ('{"error": {"message": "bad"}}', "bad"),
    ("not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
])
def test_an_error_event_or_garbage_ends_the_stream_with_its_message(data: str, message: str) -> None:
    with pytest.raises(StreamError, match=re.escape(message)):
        ChatStream().feed(data)


@pytest.mark.parametrize(("body", "detail"), [
    (b'{"error": {"message": "unknown codec", "type": "invalid_request_error", "code": null}}',
     "unknown codec (invalid_request_error)"),
    (b'{"detail": "codec: unknown"}', "codec: unknown"),
    (b'{"detail": [{"loc": ["body"], "msg": "x"}]}', '[{"loc": ["body"], "msg": "x"}]'),
    (b"Bad Gateway\n", "Bad Gateway"),
    (b"", "Internal Server Error"),
])
def test_http_error_details_are_read_from_openai_and_fastapi_bodies(body: bytes, detail: str) -> None:
    assert http_error_detail(body, "Internal Server Error") == detail


# ------------------------------------------------------------------------------------------ stub device


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[StubDevice, str]]:
    port = free_port()
    with serve_stub(port) as device:
        yield device, f"http://127.0.0.1:{port}"


def test_chat_streams_the_answer_then_prints_per_token_figures_and_totals(
        stub: tuple[StubDevice, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    device, url = stub
    monkeypatch.setenv("MEG_API_KEY", "k-chat, k-other")
    code = cli.main(["chat", QUESTION.replace("\n", "\\n"), "--url", url, "--codec", "analog", "--channel", "awgn",
                     "--snr-db", "12", "--split-layer", "3", "--max-tokens", "6", "--temperature", "0",
                     "--seed", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    body = device.requests[-1]
    assert body["model"] == MODEL_ID and body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [{"role": "user", "content": QUESTION}]  # the literal \n became a line break
    assert body["channel"] == {"model": "awgn", "snr_db": 12.0}
    assert (body["codec"], body["split_layer"], body["max_tokens"], body["temperature"], body["seed"]) == \
        ("analog", 3, 6, 0.0, 4)
    lines = out.splitlines()
    assert lines[0] == " blue"  # the streamed answer, on its own line
    assert lines[1].split() == ["#", "token", "bits", "symbols", "latency", "ms"]
    rows = [line.split() for line in lines[2:4]]
    assert [r[:4] for r in rows] == [["0", '"', 'bl"', str(BITS_PER_TOKEN)], ["1", '"ue"', str(BITS_PER_TOKEN), "1024"]]
    assert "codec analog  channel awgn @ 12.0 dB  split layer 3  finish stop" in out
    assert re.search(r"tokens 2  ttft [\d.]+ ms  tpot [\d.]+ ms  bits sent 4096  symbols 2048  airtime 1\.000 ms",
                     out), out
    assert "bits/token 2048 after the first (the first: 2048, with the prompt's hidden states)" in out
    assert "usage: prompt_tokens 12  completion_tokens 2  total_tokens 14" in out


def test_chat_sends_the_api_key_of_the_environment(stub: tuple[StubDevice, str], capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    device, url = stub
    seen: list[str | None] = []
    real_send = httpx.Client.send

    def send(self: httpx.Client, request: httpx.Request, **kwargs: object) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(httpx.Client, "send", send)
    monkeypatch.setenv("MEG_API_KEY", "k-chat, k-other")
    assert cli.main(["chat", QUESTION, "--url", url]) == 0
    assert seen == ["Bearer k-chat", "Bearer k-chat"]  # GET /v1/models, then the chat request
    capsys.readouterr()
    assert cli.main(["chat", QUESTION, "--url", url, "--api-key", "k-flag", "--model", MODEL_ID, "--json"]) == 0
    assert seen[-1] == "Bearer k-flag" and len(seen) == 3  # --model given: no GET /v1/models
    out = capsys.readouterr().out
    meg = json.loads(out[out.index("{"):])  # --json: the summary last, with the stream's per-token figures
    assert meg["bits_sent"] == 2 * BITS_PER_TOKEN and [t["text"] for t in meg["tokens"]] == [" bl", "ue"]


def test_an_error_mid_stream_is_reported_after_the_partial_answer(stub: tuple[StubDevice, str],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _, url = stub
    assert cli.main(["chat", QUESTION + " FAIL-MIDSTREAM", "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == " bl"
    assert err.strip() == "error: the channel emulator went away (upstream_unavailable, 503)"


def test_an_http_error_is_one_line_and_exit_1(stub: tuple[StubDevice, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = stub
    assert cli.main(["chat", "FAIL-BEFORE", "--url", url]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == "error 422: split_layer: must be in [1, 4]"
    assert cli.main(["chat", QUESTION, "--url", url + "/nowhere"]) == 1  # GET /v1/models answers 404
    assert capsys.readouterr().err.startswith("error 404: ")


def test_no_device_is_a_clean_message(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert cli.main(["chat", QUESTION, "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cannot reach the device at {url}: ConnectError"), err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------- real testbed


def _meg_chat(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meg_cli.main", "chat", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_meg_chat_against_the_testbed_answers_the_colour(testbed: Testbed) -> None:
    proc = _meg_chat(QUESTION, "--url", testbed.url, "--channel", "awgn", "--snr-db", "30", "--max-tokens", "8",
                     "--temperature", "0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].strip() == "blue", proc.stdout
    rows = [line.split() for line in lines[2:] if re.match(r"\s*\d+\s", line)]
    assert rows and all(int(r[-3]) >= 0 and int(r[-2]) > 0 and float(r[-1]) > 0 for r in rows), proc.stdout
    summary = re.search(r"tokens (\d+)  ttft ([\d.]+) ms  tpot [\d.-]+ ms  bits sent (\d+)", proc.stdout)
    assert summary and int(summary.group(1)) == len(rows) and float(summary.group(2)) > 0, proc.stdout
    assert "channel awgn @ 30.0 dB" in proc.stdout
    assert re.search(r"^bits/token \d+ ", proc.stdout, re.M), proc.stdout


def test_meg_chat_reports_a_rejected_request_and_exits_1(testbed: Testbed) -> None:
    proc = _meg_chat(QUESTION, "--url", testbed.url, "--codec", "no-such-codec")
    assert proc.returncode == 1
    assert re.match(r"error 4\d\d: .*no-such-codec", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""

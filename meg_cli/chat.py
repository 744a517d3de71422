"""``meg chat``: ask the device's split language model a question and watch the answer arrive token by token.

The device answers ``POST /v1/chat/completions`` with ``stream: true`` as server-sent events: OpenAI
``chat.completion.chunk`` objects whose content chunks carry ``meg_token`` (bits, channel uses and latency of
the hidden state behind that token), a final chunk with ``finish_reason`` and the request's ``meg`` summary,
then ``data: [DONE]``. An error after the stream began arrives as one ``{"error": {...}}`` event.

Only the standard library and httpx are imported (httpx inside the command), so ``meg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

DONE = "[DONE]"


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event in ``lines`` (one line each, with or without its newline).

    Follows the SSE rules the device's stream can use: an event ends at a blank line, several ``data:``
    lines of one event are joined with newlines, one space after the colon is dropped, comment lines
    (``:`` first, e.g. keep-alives) and other fields (``event:``, ``id:``, ``retry:``) carry no data.
    An event not ended by a blank line when the stream closes is still delivered.
    """
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


class StreamError(Exception):
    """The device reported an error inside the stream, or the stream broke off."""


@dataclass
class ChatStream:
    """What a streamed answer has delivered so far: text, per-token figures, the final summary."""

    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)   # meg_token of each content chunk, with its text
    finish_reason: str | None = None
    meg: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None
    done: bool = False

    def feed(self, data: str) -> str:
        """Take one event's data; return the answer text it adds ("" for none). Raises :class:`StreamError`
        on an error event or data that is not a JSON object."""
        if data.strip() == DONE:
            self.done = True
            return ""
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise StreamError(f"the device sent an event that is not JSON: {data[:200]!r}") from exc
        if not isinstance(event, dict):
            raise StreamError(f"the device sent an event that is not a JSON object: {data[:200]!r}")
        if "error" in event:
            raise StreamError(describe_error(event["error"]))
        if event.get("usage"):
            self.usage = event["usage"]
        if event.get("meg"):
            self.meg = event["meg"]
        added = ""
        for choice in event.get("choices") or []:
            added += (choice.get("delta") or {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if event.get("meg_token") is not None:
            self.tokens.append({**event["meg_token"], "text": added})
        self.text += added
        return added


def describe_error(error: Any) -> str:
    """One line from an OpenAI error object ``{"message", "type", "code"}`` (or whatever came instead)."""
    if not isinstance(error, dict):
        return str(error)
    kind = ", ".join(str(error[k]) for k in ("type", "code") if error.get(k) not in (None, ""))
    return f"{error.get('message', 'unknown error')}" + (f" ({kind})" if kind else "")


def http_error_detail(body: bytes, fallback: str) -> str:
    """The message of a non-200 answer: OpenAI's ``error.message``, FastAPI's ``detail``, else the text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:500] or fallback
    if isinstance(parsed, dict) and "error" in parsed:
        return describe_error(parsed["error"])
    if isinstance(parsed, dict) and "detail" in parsed:
        detail = parsed["detail"]
        return detail if isinstance(detail, str) else json.dumps(detail)
    return json.dumps(parsed)[:500]


def add_chat_parser(sub: Any, default_url: str, default_api_key: str | None) -> argparse.ArgumentParser:
    chat = sub.add_parser("chat", help="ask the split language model a question; stream the answer",
                          description="Ask the device's split language model a question (POST "
                                      "/v1/chat/completions, streamed): print the answer token by token, then "
                                      "each token's bits and latency and the request's totals.")
    chat.add_argument("prompt", help='e.g. "Scene: a red circle, a blue square.\\nQuestion: what colour is the '
                                     'square?" (a literal \\n is read as a line break)')
    chat.add_argument("--url", default=default_url, help="the device's REST base URL (default: %(default)s, "
                                                         "from $MEG_URL when set)")
    chat.add_argument("--model", default=None, help="a model of GET /v1/models (default: the device's first)")
    chat.add_argument("--codec", default=None,
                      help="a codec of GET /v1/codecs?source=llm-hidden (default: the device's)")
    chat.add_argument("--channel", default="ideal", help="channel model: ideal | awgn | rayleigh | rician | ...")
    chat.add_argument("--snr-db", type=float, default=None)
    chat.add_argument("--modulation", default=None, help="digital payloads: bpsk | qpsk | 16qam | 64qam")
    chat.add_argument("--fec", default=None, choices=["none", "ldpc"], help="digital payloads: forward error coding")
    chat.add_argument("--split-layer", type=int, default=None,
                      help="decoder layers the edge runs (default: the model's default_split_layer)")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None, help="0 for greedy (default: the device's)")
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--api-key", default=default_api_key, help="REST API key (default: the first of $MEG_API_KEY)")
    chat.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each read")
    chat.add_argument("--json", action="store_true",
                      help="after the answer, print the meg summary (with the per-token figures) as JSON")
    return chat


def chat_request(args: argparse.Namespace, model: str) -> dict[str, Any]:
    channel: dict[str, Any] = {"model": args.channel}
    for key in ("snr_db", "modulation", "fec"):
        if getattr(args, key) is not None:
            channel[key] = getattr(args, key)
    # A shell argument cannot easily hold a line break: "\n" typed literally separates Scene and Question.
    prompt = args.prompt.replace("\\n", "\n")
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                            "stream_options": {"include_usage": True}, "channel": channel}
    for key in ("codec", "split_layer", "max_tokens", "temperature", "seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


class _HttpStatus(Exception):
    """A non-200 answer before the stream (GET /v1/models)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def cmd_chat(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    import httpx

    out = out or sys.stdout  # looked up per call, not at import: tests and callers may swap sys.stdout
    err = err or sys.stderr
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    answer = ChatStream()
    try:
        with httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers) as client:
            model = args.model or _first_model(client)
            with client.stream("POST", "/v1/chat/completions", json=chat_request(args, model)) as resp:
                if resp.status_code != 200:
                    detail = http_error_detail(resp.read(), resp.reason_phrase)
                    print(f"error {resp.status_code}: {detail}", file=err)
                    return 1
                for data in iter_sse_data(resp.iter_lines()):
                    out.write(answer.feed(data))
                    out.flush()
                    if answer.done:
                        break
    except _HttpStatus as exc:
        print(f"error {exc.status}: {exc.detail}", file=err)
        return 1
    except StreamError as exc:
        print(f"\nerror: {exc}", file=err)
        return 1
    except httpx.HTTPError as exc:
        why = f"{type(exc).__name__}: {exc or 'no answer'}"
        if answer.text or answer.tokens:
            print(f"\nerror: the stream broke off: {why}", file=err)
        elif isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            print(f"cannot reach the device at {args.url}: {why}", file=err)
        else:
            print(f"the request to {args.url} failed: {why}", file=err)
        return 1
    if not answer.done or answer.meg is None:
        print(f"\nerror: the stream ended before the answer was complete "
              f"({'no [DONE]' if not answer.done else 'no meg summary in the final chunk'})", file=err)
        return 1
    out.write("\n")
    print_summary(answer, out)
    if args.json:
        # The stream's final meg object has no per-token list (the stream gave it token by token): add it.
        out.write(json.dumps({"tokens": answer.tokens, **answer.meg}, indent=2) + "\n")
    return 0


def _first_model(client: Any) -> str:
    """The id of the device's first model (GET /v1/models): the model to ask when none is given."""
    resp = client.get("/v1/models")
    if resp.status_code != 200:
        raise _HttpStatus(resp.status_code, http_error_detail(resp.content, resp.reason_phrase))
    models = resp.json().get("data") or []
    if not models:
        raise _HttpStatus(resp.status_code, "the device serves no language model (GET /v1/models is empty)")
    return str(models[0]["id"])


def print_summary(answer: ChatStream, out: TextIO) -> None:
    """Per-token figures, then the request's totals (from the final chunk's ``meg`` object)."""
    meg = answer.meg or {}
    tokens = meg.get("tokens") or answer.tokens  # the summary's list names each token's text; else the stream's
    if tokens:
        out.write(f"{'#':>3}  {'token':<16} {'bits':>8} {'symbols':>8} {'latency ms':>11}\n")
        for i, tok in enumerate(tokens):
            out.write(f"{tok.get('index', i):>3}  {json.dumps(tok.get('text', '')):<16} {_int(tok.get('bits')):>8} "
                      f"{_int(tok.get('symbols')):>8} {_ms(tok.get('latency_ms')):>11}\n")
    channel = meg.get("channel") or {}
    link = channel.get("model", "?") if isinstance(channel, dict) else str(channel)
    if isinstance(channel, dict) and channel.get("snr_db") is not None:
        link += f" @ {float(channel['snr_db']):.1f} dB"
    out.write(f"codec {meg.get('codec', '?')}  channel {link}  split layer {meg.get('split_layer', '?')}  "
              f"finish {answer.finish_reason or '?'}\n")
    out.write(f"tokens {len(tokens)}  ttft {_ms(meg.get('ttft_ms'))} ms  tpot {_ms(meg.get('tpot_ms'))} ms  "
              f"bits sent {_int(meg.get('bits_sent'))}  symbols {_int(meg.get('symbols_sent'))}  "
              f"airtime {_ms(meg.get('airtime_ms'), 3)} ms\n")
    bits = [float(t["bits"]) for t in tokens if t.get("bits") is not None]
    if len(bits) > 1:
        # The first token's hidden state goes with the whole prompt's (prefill): a mean over all tokens would
        # be mostly prompt, so the decode steps are averaged apart from it.
        out.write(f"bits/token {sum(bits[1:]) / len(bits[1:]):.0f} after the first "
                  f"(the first: {bits[0]:.0f}, with the prompt's hidden states)\n")
    elif bits:
        out.write(f"bits/token {bits[0]:.0f} (one token: with the prompt's hidden states)\n")
    if answer.usage:
        out.write("usage: " + "  ".join(f"{k} {v}" for k, v in answer.usage.items() if isinstance(v, int)) + "\n")


def _int(value: Any) -> str:
    return "-" if value is None else f"{int(value)}"


def _ms(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"

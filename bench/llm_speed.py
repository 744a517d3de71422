"""Speed of the split language model through the testbed (``meg bench llm``'s speed part).

* **Latency**: time to first token and time per output token of one session at a time through the three
  services (device REST → channel emulator → edge and back, every token a real round trip), against the same
  model in one process (prefill, then one decode step per token with its KV cache, no network, no codec).
  Links: ideal with a 10 GHz symbol rate (airtime ~0) and 0 or 10 ms one-way delay, and 1 MHz / 20 MHz.
  The device reports both figures itself (``meg.ttft_ms``, ``meg.tpot_ms``); answers are fixed-length
  (``ignore_eos``), so every request decodes the same number of tokens.
* **Throughput**: output tokens per second with 1, 8, 16 and 32 concurrent sessions, decode batching on
  (the edge and the device step all ready sessions together) and off (``--llm-max-batch 1`` on both).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import DynamicCache

from bench.testbed import LocalTestbed
from models.llm.loader import LoadedLlm, load_llm

log = logging.getLogger("bench.llm")

MODEL = "shapes-llm-v1"
PROMPT = "Scene: a red circle, a blue square, a green triangle.\nQuestion: how many shapes are there?\nAnswer:"
#: Links of the latency table: (label, channel object).
LATENCY_LINKS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ideal, no airtime, 0 ms", {"model": "ideal", "bandwidth_hz": 1e10, "delay_ms": 0.0}),
    ("ideal, no airtime, 10 ms", {"model": "ideal", "bandwidth_hz": 1e10, "delay_ms": 10.0}),
    ("ideal, 20 MHz, 0 ms", {"model": "ideal", "bandwidth_hz": 20e6, "delay_ms": 0.0}),
    ("ideal, 1 MHz, 0 ms", {"model": "ideal", "bandwidth_hz": 1e6, "delay_ms": 0.0}),
)


@dataclass
class SpeedConfig:
    llm_dir: Path
    tokens: int = 32
    requests: int = 10
    warmup: int = 2
    concurrency: tuple[int, ...] = (1, 8, 16, 32)
    rounds: int = 2
    codec: str = "raw-fp16"


@torch.no_grad()
def monolithic_timing(llm: LoadedLlm, prompt: str, tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of the whole model in this process, greedy, through end tokens."""
    started = time.perf_counter()
    ids = llm.tokenizer(prompt, return_tensors="pt").input_ids
    cache = DynamicCache()
    out = llm.model(ids, cache=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter()
    for _ in range(tokens - 1):
        out = llm.model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    last = time.perf_counter()
    return first - started, (last - first) / max(1, tokens - 1)


def _request(channel: dict[str, Any], tokens: int, codec: str, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "codec": codec, "channel": channel}


def latency_rows(bed: LocalTestbed, config: SpeedConfig,
                 links: tuple[tuple[str, dict[str, Any]], ...] = LATENCY_LINKS) -> list[dict[str, Any]]:
    """TTFT/TPOT through the testbed per link, interleaved with the monolithic model (A/B, medians)."""
    rows = []
    llm = load_llm(config.llm_dir)
    torch.set_num_threads(1)  # as the services' compute threads on this host (see serving.scheduler)
    with httpx.Client(base_url=bed.url, timeout=120) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for label, channel in links:
            body = _request(channel, config.tokens, config.codec, model)
            split, mono = [], []
            for i in range(config.warmup + config.requests):
                r = client.post("/v1/completions", json=body)
                r.raise_for_status()
                meg = r.json()["meg"]
                m = monolithic_timing(llm, PROMPT, config.tokens)
                if i >= config.warmup:
                    split.append((meg["ttft_ms"], meg["tpot_ms"], meg["bits_sent"], meg["symbols_sent"]))
                    mono.append((1e3 * m[0], 1e3 * m[1]))
            ttft, tpot = statistics.median(s[0] for s in split), statistics.median(s[1] for s in split)
            mono_ttft, mono_tpot = statistics.median(m[0] for m in mono), statistics.median(m[1] for m in mono)
            rows.append({"part": "latency", "model": model, "link": label, "codec": config.codec, "tokens": config.tokens,
                         "ttft_ms": ttft, "tpot_ms": tpot, "mono_ttft_ms": mono_ttft, "mono_tpot_ms": mono_tpot,
                         "tpot_ratio": tpot / mono_tpot, "ttft_ratio": ttft / mono_ttft,
                         "bits_per_token": statistics.median(s[2] for s in split) / config.tokens,
                         "symbols_per_token": statistics.median(s[3] for s in split) / config.tokens})
            log.info("latency %s: TTFT %.1f ms (mono %.1f), TPOT %.2f ms (mono %.2f)", label, ttft, mono_ttft,
                     tpot, mono_tpot)
    return rows


async def _tokens_per_s(url: str, sessions: int, rounds: int, config: SpeedConfig) -> tuple[float, int]:
    body = _request(LATENCY_LINKS[0][1], config.tokens, config.codec)
    async with httpx.AsyncClient(base_url=url, timeout=300,
                                 limits=httpx.Limits(max_connections=sessions + 4)) as client:
        async def one_client() -> int:
            done = 0
            for _ in range(rounds):
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                done += r.json()["usage"]["completion_tokens"]
            return done

        started = time.perf_counter()
        counts = await asyncio.gather(*(one_client() for _ in range(sessions)))
        return sum(counts) / (time.perf_counter() - started), sum(counts)


def throughput_rows(bed: LocalTestbed, batching: bool, config: SpeedConfig) -> list[dict[str, Any]]:
    rows = []
    asyncio.run(_tokens_per_s(bed.url, 2, 1, config))  # warm-up
    for sessions in config.concurrency:
        rate, tokens = asyncio.run(_tokens_per_s(bed.url, sessions, config.rounds, config))
        rows.append({"part": "throughput", "batching": "on" if batching else "off", "sessions": sessions,
                     "tokens": tokens, "tokens_per_s": rate, "codec": config.codec})
        log.info("throughput, batching %s, %d sessions: %.1f tokens/s", "on" if batching else "off", sessions, rate)
    return rows


def synthetic_llm_dir(out: Path, like: Path, hidden: int = 1024, layers: int = 8) -> Path:
    """A bigger Llama of the embedded model's shape family with random weights (and its tokenizer), so the
    latency table can show how the testbed's fixed per-token overhead compares with a model whose compute
    per token is not ~1 ms. Built from a config: nothing is downloaded."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    base = json.loads((like / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(like / name, out / name)
    config = LlamaConfig(**{**base, "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64, "head_dim": 64})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def run_speed(config: SpeedConfig, log_dir: Path | None = None) -> list[dict[str, Any]]:
    """The latency table (batching on) and tokens/s with batching on and off; one testbed each; then the
    zero-airtime latency of a bigger random-weight Llama (compute per token ≫ the fixed overhead)."""
    rows: list[dict[str, Any]] = []
    for batching in (True, False):
        flags = [] if batching else ["--llm-max-batch", "1"]
        bed = LocalTestbed(edge_args=flags, device_args=flags, log_dir=log_dir)
        try:
            bed.up()
            if batching:
                rows += latency_rows(bed, config)
            rows += throughput_rows(bed, batching, config)
        finally:
            bed.down()
    with tempfile.TemporaryDirectory(prefix="meg-llm-synthetic-") as tmp:
        big = synthetic_llm_dir(Path(tmp), config.llm_dir)
        flags = ["--llm-dir", str(big)]
        bed = LocalTestbed(edge_args=flags, device_args=flags, log_dir=log_dir)
        try:
            bed.up()
            big_config = dataclasses.replace(config, llm_dir=big, requests=max(3, config.requests // 2))
            for row in latency_rows(bed, big_config, links=LATENCY_LINKS[:1]):
                rows.append({**row, "model": "random Llama d=1024 x 8 layers"})
        finally:
            bed.down()
    return rows

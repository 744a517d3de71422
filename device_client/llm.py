"""The device half of the split language model: layers ``[k, L)``, the final norm, the LM head and sampling.

One generation is one ``meg.v1.LlmSession/Session`` stream through the channel emulator to the edge
(:meth:`LlmGeneration.stream`): the device sends the prompt's token ids (control plane), receives the prompt's
hidden states after the edge's layers, runs its own layers on them, samples a token, sends it back up and
receives that token's hidden state, until a stop condition. Every received hidden state is decoded with the
codec named in its header and the codec set both sides must share (a different set is refused, never decoded).

The device's forward passes of all sessions ready at a step run together on the shared
:class:`~serving.scheduler.StepScheduler` (decode batching on the device too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

import codec
from codec.sets import LLM_SOURCE, codec_set_dir, codec_set_identity
from device_client.link import DeviceLink
from device_client.receiver import link_may_have_damaged, receive_features
from meg.v1 import meg_pb2
from models.llm.loader import LoadedLlm, llm_model_id, load_llm
from models.llm.split import DeviceHalf, KVCache, sample
from radio import ChannelSpec
from serving.contract import RequestError, Status
from serving.scheduler import QueueFullError, SchedulerConfig, SchedulerStoppedError, StepScheduler
from telemetry.metrics import MegMetrics
from wire import framing
from wire.payload import CodecError

log = logging.getLogger(__name__)

#: Header params that describe one message rather than the codec's configuration.
PER_MESSAGE_PARAMS = frozenset({"side_info", "coded_tensors"})
#: Bits of one token id going up (a 32-bit id; the uplink's CRC and coding show in its channel uses).
TOKEN_ID_BITS = 32


def default_llm_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models" / "shapes_llm_v1"


# ------------------------------------------------------------------------------------------ compute


@dataclass(eq=False)
class DeviceForward:
    """One forward pass of the device layers for one session (prefill rows or one decode row)."""

    half: DeviceHalf
    cache: KVCache
    hidden: torch.Tensor        # (1, T, d)
    position: int
    logits: torch.Tensor | None = None


class LlmDeviceStepModel:
    """The scheduler's step model for the device layers: decode rows of one split layer run batched."""

    def admit(self, jobs: Sequence[DeviceForward]) -> Sequence[DeviceForward]:
        return jobs

    def step(self, states: Sequence[DeviceForward]) -> None:
        decodes: dict[int, list[DeviceForward]] = {}
        for job in states:
            if job.hidden.shape[1] == 1 and job.cache.length:
                decodes.setdefault(job.half.k, []).append(job)
            else:
                job.logits = job.half.prefill(job.hidden, job.position, job.cache)
        for group in decodes.values():
            rows = torch.cat([j.hidden for j in group], dim=0)
            logits = group[0].half.step_batch(rows, [j.position for j in group], [j.cache for j in group])
            for i, job in enumerate(group):
                job.logits = logits[i : i + 1]

    def done(self, state: DeviceForward) -> bool:
        return state.logits is not None

    def result(self, state: DeviceForward) -> torch.Tensor:
        assert state.logits is not None
        return state.logits


@dataclass
class LlmDeviceConfig:
    llm_enabled: bool = field(default=True, metadata={"help": "serve the split language model's REST API"})
    llm_dir: Path = field(default_factory=default_llm_dir, metadata={
        "help": "the same transformers folder the edge runs (default: the embedded models/shapes_llm_v1)"})
    llm_default_codec: str = field(default="raw-fp16", metadata={
        "help": "hidden-state codec when a request sets none"})
    llm_max_tokens: int = field(default=32, metadata={"help": "max_tokens when a request sets none"})
    llm_max_batch: int = field(default=32, metadata={"help": "device decode steps run together"})


class LlmDevice:
    """The loaded model, its device halves (one per split layer, weights shared) and the compute scheduler."""

    def __init__(self, config: LlmDeviceConfig, torch_device: str, metrics: MegMetrics) -> None:
        self.config = config
        self.llm: LoadedLlm = load_llm(config.llm_dir, device=torch_device)
        self.model_id = llm_model_id(config.llm_dir)
        self.tokenizer = self.llm.tokenizer
        cfg = self.llm.model.config
        self.num_layers = self.llm.num_layers
        self.context_length = int(getattr(cfg, "max_position_embeddings", 2048))
        gen = self.llm.model.generation_config
        eos = gen.eos_token_id if gen is not None and gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.stop_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        self.scheduler = StepScheduler(LlmDeviceStepModel(), SchedulerConfig(
            max_batch=config.llm_max_batch, window_ms=0.0, max_queue=1024), metrics,
            cpu=torch.device(torch_device).type == "cpu", name="device-llm")
        self._halves: dict[int, DeviceHalf] = {}
        self._sets: dict[int, tuple[Path, tuple[str, str]]] = {}

    def describe(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "hidden_size": int(self.llm.model.config.hidden_size),
                "default_split_layer": max(1, self.num_layers // 2), "context_length": self.context_length,
                "codecs": codec.codec_names(LLM_SOURCE)}

    def codec_set(self, k: int) -> tuple[Path, tuple[str, str]]:
        """Folder and (id, hash) of this device's codec set at split ``k`` (read once: sets change only with
        a restart)."""
        if k not in self._sets:
            folder = codec_set_dir(self.config.llm_dir, k)
            self._sets[k] = folder, codec_set_identity(folder, self.model_id, k)
        return self._sets[k]

    def half(self, k: int) -> DeviceHalf:
        if k not in self._halves:
            self._halves[k] = DeviceHalf(self.llm.model, k)
        return self._halves[k]

    async def forward(self, job: DeviceForward, request_id: str) -> torch.Tensor:
        try:
            return (await self.scheduler.submit(job, request_id)).value
        except QueueFullError as exc:
            raise RequestError(Status.OVERLOADED, str(exc), retry_after_s=exc.retry_after_s) from None
        except SchedulerStoppedError as exc:
            raise RequestError(Status.UNAVAILABLE, str(exc)) from None

    def stop(self) -> None:
        self.scheduler.stop(drain=False, timeout=5.0)


# ------------------------------------------------------------------------------------------ one generation


@dataclass
class CompletionJob:
    """A validated completion request, in token ids."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    codec: str
    codec_params: dict[str, str]
    spec: ChannelSpec
    split_layer: int        # 0: the edge's default
    timeout_s: float
    ignore_eos: bool = False


@dataclass
class TokenEvent:
    """One sampled token with what its hidden state cost on the air."""

    index: int
    token_id: int
    text: str               # the new text this token adds (after stop-sequence trimming)
    bits: int               # payload bits of the hidden state that produced it (side info included)
    symbols: int            # channel uses: that downlink message plus the uplink of the token before it
    airtime_ms: float
    latency_ms: float       # since the previous token (since the request for the first)


@dataclass
class CompletionSummary:
    finish_reason: str      # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    text: str
    meg: dict[str, Any]


class _Stops:
    """Stop conditions: end tokens, stop strings (trimmed from the text, as OpenAI does) and max_tokens."""

    def __init__(self, tokenizer: Any, stop_ids: frozenset[int], stop: list[str], max_tokens: int) -> None:
        self.tokenizer, self.stop_ids, self.stop, self.max_tokens = tokenizer, stop_ids, stop, max_tokens
        self.ids: list[int] = []
        self.text = ""
        self.finish: str | None = None

    def add(self, token: int) -> str:
        """Record ``token``; returns the text it adds (possibly empty)."""
        if token in self.stop_ids:
            self.finish = "stop"
            return ""
        self.ids.append(token)
        visible = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = visible.find(s)
            if cut >= 0:
                visible, self.finish = visible[:cut], "stop"
        if self.finish is None and len(self.ids) >= self.max_tokens:
            self.finish = "length"
        if self.finish is None:
            # Hold back a tail that may begin a stop string, so a stream never shows part of one.
            held = max((i for s in self.stop for i in range(1, len(s)) if visible.endswith(s[:i])), default=0)
            visible = visible[: len(visible) - held]
        delta = visible[len(self.text):] if visible.startswith(self.text) else visible
        self.text = visible
        return delta


class LlmGeneration:
    """Runs one completion over the link, yielding :class:`TokenEvent` s then a :class:`CompletionSummary`."""

    def __init__(self, device: LlmDevice, link: DeviceLink, metrics: MegMetrics) -> None:
        self.device = device
        self.link = link
        self.metrics = metrics

    async def stream(self, job: CompletionJob) -> AsyncIterator[TokenEvent | CompletionSummary]:
        started = time.perf_counter()
        call = self.link.session(job.timeout_s)
        try:
            await call.write(meg_pb2.SessionUp(open=self._open(job)))
            accepted = await self._read(call, "accepted")
            k = accepted.accepted.split_layer
            half, cache = self.device.half(k), self.device.half(k).new_cache()
            stops = _Stops(self.device.tokenizer, frozenset() if job.ignore_eos else self.device.stop_ids, job.stop,
                           job.max_tokens)
            generator = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
            totals = {"bits": 0, "symbols": 0, "airtime_ms": 0.0}
            labels = self.metrics.labels(self.device.model_id, job.codec, job.spec.model, job.spec.snr_db)
            times: list[float] = []
            codecs: dict[tuple, codec.Codec] = {}
            position = 0
            while stops.finish is None:
                down = (await self._read(call, "hidden")).hidden
                hidden, bits = self._decode(down, job, k, codecs)
                logits = await self.device.forward(DeviceForward(half, cache, hidden, position), job.request_id)
                token = int(sample(logits[0], job.temperature, job.top_p, generator))
                position += int(down.rows)
                now = time.perf_counter()
                event = self._event(len(times), token, stops.add(token), down, bits,
                                    now - (times[-1] if times else started))
                times.append(now)
                for key, value in (("bits", event.bits), ("symbols", event.symbols),
                                   ("airtime_ms", event.airtime_ms)):
                    totals[key] += value
                self.metrics.llm_token_bytes.labels(**labels).observe(event.bits / 8)
                yield event
                if stops.finish is None:
                    totals["bits"] += TOKEN_ID_BITS
                    await call.write(meg_pb2.SessionUp(token=meg_pb2.TokenUp(position=position, token_id=token)))
            await call.write(meg_pb2.SessionUp(close=meg_pb2.SessionClose(reason=stops.finish or "")))
            await call.done_writing()
            yield self._summary(job, stops, totals, times, started, k)
        except grpc.aio.AioRpcError as exc:
            error = self.link.link_error(exc)
            raise RequestError(Status.from_http(error.http_status), error.reason,
                               float(error.retry_after_s) if error.retry_after_s else None, error.kind) from exc
        finally:
            call.cancel()  # no-op when finished; on cancellation (client gone) the edge frees the session now

    def _open(self, job: CompletionJob) -> meg_pb2.SessionOpen:
        request = meg_pb2.SessionOpen(session_id=job.request_id, prompt_ids=job.prompt_ids,
                                      split_layer=job.split_layer, codec=job.codec, codec_params=job.codec_params,
                                      max_tokens=job.max_tokens)
        job.spec.to_proto(request.channel)
        return request

    @staticmethod
    async def _read(call: Any, kind: str) -> meg_pb2.SessionDown:
        message = await call.read()
        if message is grpc.aio.EOF:
            raise RequestError(Status.BAD_STREAM, f"the session ended before the edge sent {kind}",
                               label="bad_stream")
        if message.WhichOneof("msg") != kind:
            raise RequestError(Status.BAD_STREAM, f"expected {kind} from the edge, got {message.WhichOneof('msg')}",
                               label="bad_stream")
        return message

    def _decode(self, down: meg_pb2.HiddenStates, job: CompletionJob, k: int, codecs: dict[tuple, codec.Codec]
                ) -> tuple[torch.Tensor, int]:
        """The received rows, and the bits their payload cost (side information included)."""
        set_dir, mine = self.device.codec_set(k)
        if (down.header.codec_set, down.header.codec_set_hash) != mine:
            raise RequestError(Status.BAD_STREAM, f"codec set mismatch: the edge coded with "
                               f"{down.header.codec_set!r} ({down.header.codec_set_hash[:12] or 'unfitted'}), this "
                               f"device has {mine[0]!r} ({mine[1][:12] or 'unfitted'})", label="codec_set_mismatch")
        try:
            payload = framing.payload_of_hidden(down)
            # One codec per configuration for the session: building one may load fitted weights.
            config = {k: v for k, v in down.header.codec_params.items() if k not in PER_MESSAGE_PARAMS}
            key = (down.header.codec_id, tuple(sorted(config.items())))
            if key not in codecs:
                codecs[key] = codec.build_codec(down.header.codec_id, config, set_dir)
            hidden_codec = codecs[key]
            erased = [(r.start, r.end) for r in down.channel.erased]
            reception = receive_features(hidden_codec, payload, link_may_have_damaged(job.spec, payload, erased),
                                         bound=None)
            bits = payload.bits_sent
        except (framing.StreamError, CodecError) as exc:
            raise RequestError(Status.BAD_STREAM, f"device could not decode the hidden states: {exc}",
                               label="decode_failed") from exc
        return reception.tensors["hidden"], bits

    @staticmethod
    def _event(index: int, token: int, text: str, down: meg_pb2.HiddenStates, bits: int, latency_s: float
               ) -> TokenEvent:
        symbols = int(down.channel.symbols + down.channel.side_info_symbols + down.uplink.symbols)
        return TokenEvent(index, token, text, bits, symbols, down.channel.airtime_ms + down.uplink.airtime_ms,
                          1e3 * latency_s)

    def _summary(self, job: CompletionJob, stops: _Stops, totals: dict[str, float], times: list[float],
                 started: float, k: int) -> CompletionSummary:
        ttft = times[0] - started
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        labels = self.metrics.labels(self.device.model_id, job.codec, job.spec.model, job.spec.snr_db)
        self.metrics.llm_ttft.labels(**labels).observe(ttft)
        if len(times) > 1:
            self.metrics.llm_tpot.labels(**labels).observe(tpot)
        meg = {"bits_sent": int(totals["bits"]), "symbols_sent": int(totals["symbols"]),
               "airtime_ms": totals["airtime_ms"], "ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * tpot,
               "split_layer": k, "codec": job.codec, "channel": job.spec.to_mapping()}
        return CompletionSummary(stops.finish or "stop", len(job.prompt_ids), len(times), stops.text, meg)


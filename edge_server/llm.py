"""The edge half of the split language model: sessions, their KV caches, and batched decode steps.

One ``meg.v1.LlmSession/Session`` stream per generation (opened by the device through the channel emulator):

1. ``open`` is validated (naming the field) and admitted against the session table: a bounded number of
   sessions and a bounded KV-cache memory, reserved for prompt + ``max_tokens`` rows up front, so a session
   that was admitted can always finish; a full table answers RESOURCE_EXHAUSTED with a retry-after estimate;
2. the prompt's hidden states after layer ``k - 1`` go down as one :class:`HiddenStates` message;
3. each sampled token that comes back up is embedded and run through layers ``[0, k)`` against the session's
   cache, and that row goes down.

Every forward pass is a job of the shared :class:`~serving.scheduler.StepScheduler`, so the decode steps of
all sessions that are ready at a step boundary run as one batched call (iteration-level batching), and a new
session's prefill joins between steps. The session's cache is freed when the stream ends for any reason: the
device closes it, the client disconnects (the stream is cancelled), the deadline passes, or no token arrives
for ``llm_idle_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

import codec
from codec.base import CodecError
from codec.registry import check_request_params
from codec.sets import LLM_SOURCE, codec_set_dir, codec_set_identity
from meg.v1 import meg_pb2
from models.llm.loader import LoadedLlm
from models.llm.split import EdgeHalf, KVCache
from serving.contract import CallContext, RequestError, Status
from serving.scheduler import QueueFullError, SchedulerConfig, SchedulerStoppedError, StepScheduler
from telemetry.metrics import MegMetrics
from wire import framing

log = logging.getLogger(__name__)

SESSION_SERVICE = "meg.v1.LlmSession"


def default_llm_dir() -> Path:
    """The embedded default language model, committed with the project."""
    return Path(__file__).resolve().parent.parent / "models" / "shapes_llm_v1"


@dataclass
class LlmEdgeConfig:
    llm_enabled: bool = field(default=True, metadata={"help": "serve the split language model"})
    llm_dir: Path = field(default_factory=default_llm_dir, metadata={
        "help": "transformers Llama-family folder (default: the embedded models/shapes_llm_v1)"})
    llm_split_layer: int = field(default=0, metadata={
        "help": "decoder layers the edge runs when a session sets none (0: half of them)"})
    llm_max_sessions: int = field(default=64, metadata={"help": "open sessions at most (503 beyond)"})
    llm_max_kv_mb: float = field(default=256.0, metadata={
        "help": "KV-cache memory the sessions may reserve, MiB (503 beyond)"})
    llm_idle_s: float = field(default=30.0, metadata={
        "help": "free a session's cache when no token arrives for this long"})
    llm_max_batch: int = field(default=32, metadata={"help": "decode steps run together (1 disables batching)"})
    llm_window_ms: float = field(default=0.0, metadata={
        "help": "when idle, how long to wait for more steps before running one"})

    def __post_init__(self) -> None:
        if self.llm_split_layer < 0:
            raise ValueError(f"llm_split_layer must be ≥ 0, got {self.llm_split_layer}")
        if self.llm_max_sessions < 1 or self.llm_max_kv_mb <= 0 or self.llm_idle_s <= 0:
            raise ValueError("llm_max_sessions, llm_max_kv_mb and llm_idle_s must be positive")

    def scheduler(self) -> SchedulerConfig:
        # Waiting steps queue for at most one step each; the queue bound is the session bound.
        return SchedulerConfig(max_batch=self.llm_max_batch, window_ms=self.llm_window_ms,
                               max_queue=max(self.llm_max_sessions, 1), policy="step")


# ------------------------------------------------------------------------------------------ compute


@dataclass(eq=False)
class ForwardJob:
    """One forward pass of one session: the prompt at prefill, one token at a decode step."""

    half: EdgeHalf
    cache: KVCache
    token_ids: list[int]
    position: int
    hidden: torch.Tensor | None = None


class LlmEdgeStepModel:
    """The scheduler's :class:`~serving.scheduler.StepModel` for the edge layers: a job takes one step.

    Decode jobs of the same split layer run as one :meth:`EdgeHalf.step_batch` call; prefills run one by one
    (their lengths differ), in the same step.
    """

    def admit(self, jobs: Sequence[ForwardJob]) -> Sequence[ForwardJob]:
        return jobs

    def step(self, states: Sequence[ForwardJob]) -> None:
        decodes: dict[int, list[ForwardJob]] = {}
        for job in states:
            if len(job.token_ids) == 1 and job.cache.length:
                decodes.setdefault(job.half.k, []).append(job)
            else:
                job.hidden = job.half.prefill(torch.tensor([job.token_ids]), job.position, job.cache)
        for group in decodes.values():
            half = group[0].half
            rows = half.step_batch([j.token_ids[0] for j in group], [j.position for j in group],
                                   [j.cache for j in group])
            for i, job in enumerate(group):
                job.hidden = rows[i : i + 1]

    def done(self, state: ForwardJob) -> bool:
        return state.hidden is not None

    def result(self, state: ForwardJob) -> torch.Tensor:
        assert state.hidden is not None
        return state.hidden


# ------------------------------------------------------------------------------------------ sessions


@dataclass(eq=False)
class EdgeSession:
    session_id: str
    half: EdgeHalf
    cache: KVCache
    codec: codec.Codec
    codec_name: str
    prompt_len: int
    max_tokens: int
    kv_bytes: int
    codec_set: tuple[str, str] = ("", "")  # (id, content hash) of the codec set the payloads use
    tokens_in: int = 0
    opened: float = field(default_factory=time.monotonic)

    @property
    def next_position(self) -> int:
        return self.prompt_len + self.tokens_in


class SessionTable:
    """Open sessions and the KV memory they reserved; refuses beyond either bound."""

    def __init__(self, max_sessions: int, max_kv_bytes: int, metrics: MegMetrics) -> None:
        self.max_sessions = max_sessions
        self.max_kv_bytes = max_kv_bytes
        self.metrics = metrics
        self.sessions: dict[str, EdgeSession] = {}
        self._mean_session_s = 2.0  # moving average of a session's life (for retry-after)

    @property
    def reserved_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.sessions.values())

    def admit(self, session: EdgeSession) -> None:
        if session.session_id in self.sessions:
            raise RequestError(Status.INVALID, f"open.session_id: session {session.session_id!r} is already open")
        full = (f"{len(self.sessions)} sessions open (at most {self.max_sessions})"
                if len(self.sessions) >= self.max_sessions else
                f"KV memory: {session.kv_bytes} B needed, {self.max_kv_bytes - self.reserved_bytes} B of "
                f"{self.max_kv_bytes} B free" if self.reserved_bytes + session.kv_bytes > self.max_kv_bytes else "")
        if full:
            self.metrics.error("sessions_full")
            raise RequestError(Status.OVERLOADED, f"edge is full: {full}; retry later",
                               retry_after_s=max(1.0, self._mean_session_s))
        self.sessions[session.session_id] = session
        self._gauge()

    def close(self, session: EdgeSession, reason: str) -> None:
        if self.sessions.pop(session.session_id, None) is None:
            return
        session.cache.reset()  # frees the keys and values now, whoever still holds the session object
        life = time.monotonic() - session.opened
        self._mean_session_s = 0.9 * self._mean_session_s + 0.1 * life
        self._gauge()
        log.info("session closed (%s) after %d tokens, %.2f s", reason, session.tokens_in, life,
                 extra={"request_id": session.session_id})

    def _gauge(self) -> None:
        self.metrics.llm_sessions.labels(self.metrics.service).set(len(self.sessions))


def kv_bytes_per_row(llm: LoadedLlm, layers: int) -> int:
    """KV-cache bytes one sequence row costs in ``layers`` layers (keys and values)."""
    cfg = llm.model.config
    heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return 2 * layers * heads * head_dim * llm.model.dtype.itemsize


class LlmSessionApi:
    """Serves ``meg.v1.LlmSession/Session`` on the edge (see the module docstring)."""

    service = "edge"

    def __init__(self, llm: LoadedLlm, model_id: str, config: LlmEdgeConfig, scheduler: StepScheduler,
                 metrics: MegMetrics) -> None:
        self.llm = llm
        self.model_id = model_id
        self.config = config
        self.scheduler = scheduler
        self.metrics = metrics
        self.num_layers = llm.num_layers
        self.default_split = config.llm_split_layer or max(1, self.num_layers // 2)
        if not 1 <= self.default_split <= self.num_layers:
            raise ValueError(f"llm_split_layer {config.llm_split_layer} out of [1, {self.num_layers}]")
        self.context_length = int(getattr(llm.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(llm.model.config.vocab_size)
        self.table = SessionTable(config.llm_max_sessions, int(config.llm_max_kv_mb * 2**20), metrics)
        self._halves: dict[int, EdgeHalf] = {}

    def half(self, k: int) -> EdgeHalf:
        """The edge half for split layer ``k`` (weights shared with the loaded model)."""
        if k not in self._halves:
            self._halves[k] = EdgeHalf(self.llm.model, k)
        return self._halves[k]

    # -- validation ------------------------------------------------------------------------------------------
    def open_session(self, request: meg_pb2.SessionOpen, ctx: CallContext) -> EdgeSession:
        """Validate ``open`` (naming the field) and build its session (not yet admitted)."""
        k = request.split_layer or self.default_split
        if not 1 <= k <= self.num_layers:
            raise RequestError(Status.INVALID, f"split_layer: must be in [1, {self.num_layers}] (the edge runs "
                               f"layers [0, k)), got {request.split_layer}")
        ids = list(request.prompt_ids)
        if not ids:
            raise RequestError(Status.INVALID, "prompt: must not be empty")
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(Status.INVALID, f"prompt_ids: token ids must be in [0, {self.vocab_size})")
        if request.max_tokens < 1:
            raise RequestError(Status.INVALID, f"max_tokens: must be ≥ 1, got {request.max_tokens}")
        if len(ids) + request.max_tokens > self.context_length:
            raise RequestError(Status.INVALID, f"max_tokens: prompt ({len(ids)} tokens) + max_tokens "
                               f"({request.max_tokens}) exceeds the context length {self.context_length}")
        feature_codec = self._codec(request, k)
        half = self.half(k)
        rows = len(ids) + request.max_tokens
        return EdgeSession(request.session_id or ctx.request_id, half, half.new_cache(), feature_codec,
                           request.codec, len(ids), request.max_tokens, rows * kv_bytes_per_row(self.llm, k),
                           codec_set_identity(codec_set_dir(self.llm.path, k), self.model_id, k))

    def _codec(self, request: meg_pb2.SessionOpen, k: int) -> codec.Codec:
        names = codec.codec_names(LLM_SOURCE)
        if request.codec not in names:
            raise RequestError(Status.INVALID, f"codec: {request.codec!r} is not a hidden-state codec; "
                               f"known: {', '.join(names)}")
        params = dict(request.codec_params)
        try:
            check_request_params(request.codec, params)
            if request.HasField("csi"):  # the emulator's estimate (0 dB is an estimate too)
                params.setdefault("channel_snr_db", f"{request.csi.snr_estimate_db:g}")
            return codec.build_codec(request.codec, params, codec_set_dir(self.llm.path, k))
        except (CodecError, ValueError) as exc:
            raise RequestError(Status.INVALID, f"codec_params: {exc}") from None

    # -- the session -----------------------------------------------------------------------------------------
    async def handle(self, messages: AsyncIterator[meg_pb2.SessionUp], ctx: CallContext
                     ) -> AsyncIterator[meg_pb2.SessionDown]:
        first = await anext(messages, None)
        if first is None:
            return
        if first.WhichOneof("msg") != "open":
            raise RequestError(Status.INVALID, "session: the first message must open the session")
        ctx.labels.update(codec=first.open.codec if first.open.codec in codec.codec_names(LLM_SOURCE)
                          else "invalid")
        session = self.open_session(first.open, ctx)
        ctx.request_id = session.session_id
        self.table.admit(session)
        reason = "aborted"
        try:
            k = session.half.k
            yield meg_pb2.SessionDown(accepted=meg_pb2.SessionAccepted(
                session_id=session.session_id, model_id=self.model_id, split_layer=k, num_layers=self.num_layers,
                hidden_size=int(self.llm.model.config.hidden_size)))
            hidden = await self._forward(session, list(first.open.prompt_ids), 0, ctx)
            yield self._down(session, hidden, 0)
            async for token in self._tokens(messages, session):
                hidden = await self._forward(session, [token.token_id], int(token.position), ctx)
                session.tokens_in += 1
                yield self._down(session, hidden, int(token.position))
            reason = "closed by the device"
        finally:
            self.table.close(session, reason)

    async def _tokens(self, messages: AsyncIterator[meg_pb2.SessionUp], session: EdgeSession
                      ) -> AsyncIterator[meg_pb2.TokenUp]:
        """The session's tokens, checked; ends at ``close`` or end of stream; idle too long → DEADLINE."""
        while True:
            try:
                message = await asyncio.wait_for(anext(messages, None), self.config.llm_idle_s)
            except TimeoutError:
                raise RequestError(Status.DEADLINE, f"session idle: no token for {self.config.llm_idle_s:g} s; "
                                   "its cache was freed", label="session_idle") from None
            if message is None or message.WhichOneof("msg") == "close":
                return
            if message.WhichOneof("msg") != "token":
                raise RequestError(Status.INVALID, "session: only token or close may follow open")
            token = message.token
            if token.position != session.next_position:
                raise RequestError(Status.INVALID, f"token.position: expected {session.next_position}, got "
                                   f"{token.position} (the two halves disagree on where they are)")
            if not 0 <= token.token_id < self.vocab_size:
                raise RequestError(Status.INVALID, f"token.token_id: must be in [0, {self.vocab_size})")
            if session.tokens_in >= session.max_tokens:
                raise RequestError(Status.INVALID, f"max_tokens: the session asked for {session.max_tokens} "
                                   "tokens and sent more")
            yield token

    async def _forward(self, session: EdgeSession, token_ids: list[int], position: int, ctx: CallContext
                       ) -> torch.Tensor:
        job = ForwardJob(session.half, session.cache, token_ids, position)
        try:
            completion = await self.scheduler.submit(job, ctx.request_id)
        except QueueFullError as exc:
            raise RequestError(Status.OVERLOADED, str(exc), retry_after_s=exc.retry_after_s) from None
        except SchedulerStoppedError as exc:
            raise RequestError(Status.UNAVAILABLE, str(exc)) from None
        return completion.value

    def _down(self, session: EdgeSession, hidden: torch.Tensor, position: int) -> meg_pb2.SessionDown:
        try:
            payload = session.codec.encode({"hidden": hidden.detach().float().reshape(1, -1, hidden.shape[-1])})
        except CodecError as exc:
            raise RequestError(Status.INVALID, f"codec_params: {exc}") from None
        set_name, set_hash = session.codec_set
        header = meg_pb2.StreamHeader(request_id=session.session_id, model_id=self.model_id,
                                      codec_id=session.codec_name, codec_set=set_name, codec_set_hash=set_hash)
        return meg_pb2.SessionDown(hidden=framing.hidden_message(payload, position, hidden.shape[-2], header))


"""The edge/device split of a Llama-family decoder, each half with its own KV cache.

The edge runs the token embeddings and decoder layers ``[0, k)``; the device runs layers ``[k, L)``, the
final norm, the LM head and sampling. The hidden state after layer ``k - 1`` (the residual stream, before
any norm) is what crosses the channel: the whole prompt's rows at prefill, then one row per decode step.

Why each half computes its own rotary embeddings and causal mask from *absolute positions*: a half owns
only its own layers' keys and values, so nothing else tells it where a row sits in the sequence. A device
half whose cache believed the past was empty would rotate the first decode step's query as position 0 and
let it attend nowhere; here every call carries the positions of its rows, each cache records the positions
of its entries, and the mask is ``key_position <= query_position`` (and inside the sliding window, where a
layer has one), so both halves reproduce the monolithic model's attention exactly. Positions must continue
the cache contiguously; a mismatch raises :class:`PositionError` instead of silently shifting.

``k`` ranges over ``[1, L]``: ``k = 0`` is refused (the edge must run at least one layer; otherwise the
"hidden state" is a table lookup of the token id the device already has), ``k = L`` is allowed (the device
runs only the final norm, the LM head and sampling, and keeps no KV cache).

Batched decode: :meth:`EdgeHalf.step_batch` and :meth:`DeviceHalf.step_batch` run one decode step for many
sessions at once, each with its own :class:`KVCache` of any length; shorter caches are padded and the
padding is masked out, so a batched step equals the sessions' single steps.

Layers are the model's own modules, called as ``layer(hidden, attention_mask=, position_embeddings=,
position_ids=, cache=)`` (the transformers 5.x decoder-layer interface shared by Llama, Qwen2, Qwen3 and
Mistral); the cache passed in is a small adapter whose ``update`` is the only method those layers call.
Attention must be ``sdpa`` or ``eager`` (they take the explicit 4-D additive mask built here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

__all__ = [
    "DeviceHalf", "EdgeHalf", "KVCache", "PositionError", "sample", "split_generate", "validate_split",
]


class PositionError(ValueError):
    """A call's positions do not continue its cache (the two halves disagree on where they are)."""


@dataclass
class KVCache:
    """Keys and values of one session for a contiguous slice of layers, with the positions they hold.

    ``keys[i]``/``values[i]``: ``(1, kv_heads, S, head_dim)`` of the slice's ``i``-th layer (None while
    empty); ``positions``: ``(S,)`` absolute positions of the cached rows.
    """

    num_layers: int
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [None] * self.num_layers
            self.values = [None] * self.num_layers

    @property
    def length(self) -> int:
        return int(self.positions.numel())

    @property
    def next_position(self) -> int:
        """Absolute position the next row must have (0 for an empty cache)."""
        return int(self.positions[-1]) + 1 if self.length else 0

    def reset(self) -> None:
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.positions = torch.zeros(0, dtype=torch.long)

    def nbytes(self) -> int:
        """Memory held by the keys and values (what the edge reserves per session)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


class _ForwardCache:
    """The cache object handed to the layers during one forward: past keys/values (padded to a common
    length when several sessions run together) plus the rows being added, kept for scattering back."""

    def __init__(self, first_layer: int, past: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        self.first_layer = first_layer
        self.past = past
        self.new: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(past)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_idx - self.first_layer
        self.new[i] = (key_states, value_states)
        past = self.past[i]
        if past is None:
            return key_states, value_states
        return torch.cat([past[0], key_states], dim=2), torch.cat([past[1], value_states], dim=2)


def validate_split(model: PreTrainedModel, k: int) -> int:
    """Check ``1 <= k <= L`` and the attention implementation; returns L."""
    n = int(model.config.num_hidden_layers)
    if not 1 <= k <= n:
        raise ValueError(f"split layer k={k} out of range: the edge runs layers [0, k) with 1 <= k <= {n} "
                         "(k = 0 would leave the edge only the embedding table)")
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation {impl!r} is not supported by the split; load with "
                         "attn_implementation='sdpa' or 'eager'")
    return n


def _layer_window(config: object, layer_idx: int) -> int | None:
    """Sliding-window size of a layer (None: full causal attention), as the model's own masks use it."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if getattr(config, "model_type", None) == "mistral":
        return window
    return None


def _as_positions(positions: torch.Tensor | Sequence[int] | int | None, rows: int, start: int) -> torch.Tensor:
    """``(rows,)`` absolute positions: given explicitly, from a first position, or continuing the cache."""
    if positions is None:
        return torch.arange(start, start + rows)
    if isinstance(positions, int):
        return torch.arange(positions, positions + rows)
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).cpu()
    if pos.numel() != rows:
        raise ValueError(f"{pos.numel()} positions given for {rows} rows")
    return pos


class _Slice(nn.Module):
    """Decoder layers ``[lo, hi)`` of a model, run on absolute positions against per-session caches."""

    def __init__(self, model: PreTrainedModel, lo: int, hi: int) -> None:
        super().__init__()
        base = model.model
        self.config = model.config
        self.lo, self.hi = lo, hi
        self.layers = nn.ModuleList(base.layers[lo:hi])
        self.rotary_emb = base.rotary_emb
        self.windows = [_layer_window(model.config, i) for i in range(lo, hi)]

    def new_cache(self) -> KVCache:
        return KVCache(self.hi - self.lo)

    def _mask(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor, window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive ``(B, 1, T, S)`` mask: 0 where a query may attend a key, dtype-min elsewhere."""
        allowed = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        if window is not None:
            allowed &= k_pos[:, None, :] > q_pos[:, :, None] - window
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def forward(self, hidden: torch.Tensor, positions: list[torch.Tensor], caches: Sequence[KVCache]) -> torch.Tensor:
        """Run the slice on ``hidden (B, T, d)``; row ``b`` has ``positions[b] (T,)`` and cache ``caches[b]``.

        Every cache must continue at ``positions[b][0]``; on return each holds its session's new rows.
        """
        for b, (pos, cache) in enumerate(zip(positions, caches)):
            if int(pos[0]) != cache.next_position or (pos.numel() > 1 and bool((pos.diff() != 1).any())):
                raise PositionError(f"session {b}: rows at positions {pos.tolist()[:4]}... do not continue a cache "
                                    f"whose next position is {cache.next_position}")
        dev = hidden.device
        q_pos = torch.stack(positions).to(dev)
        lengths = [c.length for c in caches]
        s_max = max(lengths)
        # Past positions/validity padded to the longest cache; the padding is never attended.
        past_pos = torch.zeros(len(caches), s_max, dtype=torch.long)
        past_ok = torch.zeros(len(caches), s_max, dtype=torch.bool)
        for b, c in enumerate(caches):
            past_pos[b, : c.length] = c.positions
            past_ok[b, : c.length] = True
        k_pos = torch.cat([past_pos.to(dev), q_pos], dim=1)
        k_ok = torch.cat([past_ok.to(dev), torch.ones_like(q_pos, dtype=torch.bool)], dim=1)
        fwd = _ForwardCache(self.lo, [self._padded_past(caches, i, s_max) for i in range(len(self.layers))])
        position_embeddings = self.rotary_emb(hidden, position_ids=q_pos)
        masks = {w: self._mask(q_pos, k_pos, k_ok, w, hidden.dtype) for w in set(self.windows)}
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention_mask=masks[self.windows[i]], position_embeddings=position_embeddings,
                           position_ids=q_pos, cache=fwd, use_cache=True)
        self._scatter(fwd, caches, positions)
        return hidden

    @staticmethod
    def _padded_past(caches: Sequence[KVCache], i: int, s_max: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if s_max == 0:
            return None
        if len(caches) == 1:
            return caches[0].keys[i], caches[0].values[i]  # type: ignore[return-value]
        ref = next(c.keys[i] for c in caches if c.keys[i] is not None)
        assert ref is not None
        shape = (len(caches), ref.shape[1], s_max, ref.shape[3])
        keys, values = ref.new_zeros(shape), ref.new_zeros(shape)
        for b, c in enumerate(caches):
            if c.length:
                keys[b, :, : c.length] = c.keys[i][0]  # type: ignore[index]
                values[b, :, : c.length] = c.values[i][0]  # type: ignore[index]
        return keys, values

    @staticmethod
    def _scatter(fwd: _ForwardCache, caches: Sequence[KVCache], positions: list[torch.Tensor]) -> None:
        for b, c in enumerate(caches):
            for i, new in enumerate(fwd.new):
                assert new is not None, "a layer did not call cache.update"
                k, v = new[0][b : b + 1], new[1][b : b + 1]
                c.keys[i] = k if c.keys[i] is None else torch.cat([c.keys[i], k], dim=2)  # type: ignore[list-item]
                c.values[i] = v if c.values[i] is None else torch.cat([c.values[i], v], dim=2)  # type: ignore[list-item]
            c.positions = torch.cat([c.positions, positions[b].cpu()])


class EdgeHalf(nn.Module):
    """Embeddings and decoder layers ``[0, k)``, with its own KV cache (the edge side of the split).

    ``prefill(input_ids (1, T)) -> hidden (1, T, d)``, then ``step(token_id, position) -> hidden (1, 1, d)``
    per decode step. ``cache=`` selects another session's :class:`KVCache` (from :meth:`new_cache`); by
    default the half's own cache is used. The weights are shared with ``model``, not copied.
    """

    def __init__(self, model: PreTrainedModel, k: int) -> None:
        super().__init__()
        self.num_layers = validate_split(model, k)
        self.k = k
        self.embed_tokens = model.model.embed_tokens
        self.slice = _Slice(model, 0, k)
        self.cache = self.slice.new_cache()

    def new_cache(self) -> KVCache:
        return self.slice.new_cache()

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, positions: torch.Tensor | Sequence[int] | int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Hidden states after layer ``k - 1`` for the prompt ``input_ids (1, T)``."""
        cache = self.cache if cache is None else cache
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"prefill takes input_ids of shape (1, T), got {tuple(input_ids.shape)}")
        pos = _as_positions(positions, input_ids.shape[1], cache.next_position)
        device = self.embed_tokens.weight.device
        return self.slice(self.embed_tokens(input_ids.to(device)), [pos], [cache])

    @torch.no_grad()
    def step(self, token_id: int | torch.Tensor, position: int, cache: KVCache | None = None) -> torch.Tensor:
        """Hidden state ``(1, 1, d)`` of one new token at absolute ``position``."""
        ids = torch.as_tensor(token_id, dtype=torch.long).reshape(1, 1)
        return self.prefill(ids, position, cache)

    @torch.no_grad()
    def step_batch(
        self, token_ids: torch.Tensor | Sequence[int], positions: torch.Tensor | Sequence[int], caches: Sequence[KVCache]
    ) -> torch.Tensor:
        """One decode step for ``B`` sessions at once: ``token_ids (B,)``, ``positions (B,)`` -> ``(B, 1, d)``."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1, 1)
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if not ids.shape[0] == pos.numel() == len(caches):
            raise ValueError(f"{ids.shape[0]} tokens, {pos.numel()} positions and {len(caches)} caches differ")
        device = self.embed_tokens.weight.device
        return self.slice(self.embed_tokens(ids.to(device)), [p.reshape(1) for p in pos], caches)


class DeviceHalf(nn.Module):
    """Decoder layers ``[k, L)``, the final norm and the LM head, with its own KV cache (the device side).

    ``prefill(hidden (1, T, d), positions) -> logits (1, vocab)`` of the last row, then
    ``step(hidden (1, 1, d), position) -> logits (1, vocab)``. Received hidden states are cast to the
    model's dtype (a float16 transfer arrives as float16).
    """

    def __init__(self, model: PreTrainedModel, k: int) -> None:
        super().__init__()
        self.num_layers = validate_split(model, k)
        self.k = k
        self.slice = _Slice(model, k, self.num_layers)
        self.norm = model.model.norm
        self.lm_head = model.lm_head
        self.cache = self.slice.new_cache()

    def new_cache(self) -> KVCache:
        return self.slice.new_cache()

    def reset(self) -> None:
        self.cache.reset()

    def _run(
        self, hidden: torch.Tensor, positions: list[torch.Tensor], caches: Sequence[KVCache], all_rows: bool = False
    ) -> torch.Tensor:
        hidden = hidden.to(device=self.norm.weight.device, dtype=self.norm.weight.dtype)
        if self.slice.layers:
            hidden = self.slice(hidden, positions, caches)
        else:  # k = L: nothing to attend, but positions are still checked and recorded
            for b, (pos, cache) in enumerate(zip(positions, caches)):
                if int(pos[0]) != cache.next_position:
                    raise PositionError(f"session {b}: position {int(pos[0])} != expected {cache.next_position}")
                cache.positions = torch.cat([cache.positions, pos.cpu()])
        return self.lm_head(self.norm(hidden if all_rows else hidden[:, -1]))

    @torch.no_grad()
    def prefill(
        self, hidden: torch.Tensor, positions: torch.Tensor | Sequence[int] | int | None = None,
        cache: KVCache | None = None, all_rows: bool = False,
    ) -> torch.Tensor:
        """Logits ``(1, vocab)`` after the last row of ``hidden (1, T, d)`` (rows at ``positions``);
        ``all_rows``: logits ``(1, T, vocab)`` of every row (teacher-forced evaluation)."""
        cache = self.cache if cache is None else cache
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"prefill takes hidden states of shape (1, T, d), got {tuple(hidden.shape)}")
        return self._run(hidden, [_as_positions(positions, hidden.shape[1], cache.next_position)], [cache], all_rows)

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, position: int, cache: KVCache | None = None) -> torch.Tensor:
        """Logits ``(1, vocab)`` for one received row ``hidden (1, 1, d)`` at absolute ``position``."""
        return self.prefill(hidden.reshape(1, 1, -1), position, cache)

    @torch.no_grad()
    def step_batch(
        self, hidden: torch.Tensor, positions: torch.Tensor | Sequence[int], caches: Sequence[KVCache]
    ) -> torch.Tensor:
        """One decode step for ``B`` sessions: ``hidden (B, 1, d)``, ``positions (B,)`` -> logits ``(B, vocab)``."""
        pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if not hidden.shape[0] == pos.numel() == len(caches):
            raise ValueError(f"{hidden.shape[0]} rows, {pos.numel()} positions and {len(caches)} caches differ")
        return self._run(hidden.reshape(hidden.shape[0], 1, -1), [p.reshape(1) for p in pos], caches)


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next token ids ``(B,)`` from ``logits (B, vocab)`` (or ``(vocab,)`` -> a 0-d tensor).

    ``temperature == 0``: greedy (argmax, ties to the lowest id). Otherwise softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches ``top_p`` (nucleus), drawn with
    ``generator``: a seeded ``torch.Generator`` makes the draw reproducible.
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    squeeze = logits.dim() == 1
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if temperature == 0.0:
        out = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep a token when the mass *before* it is below top_p: the first token is always kept.
            keep_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) < top_p
            keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        out = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(-1).to(logits.device)
    return out[0] if squeeze else out


def split_generate(
    edge: EdgeHalf,
    device: DeviceHalf,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    transfer: Callable[[torch.Tensor], torch.Tensor] = lambda h: h,
) -> list[int]:
    """Generate with the two halves in one process; ``transfer`` models the link (identity: exact floats).

    Both halves are reset first. Returns the new token ids (stopping after an end-of-sequence token).
    """
    edge.reset()
    device.reset()
    stop = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    logits = device.prefill(transfer(edge.prefill(input_ids)), 0)
    position = input_ids.shape[1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(sample(logits[0], temperature, top_p, generator))
        out.append(token)
        if token in stop or len(out) == max_new_tokens:
            break
        logits = device.step(transfer(edge.step(token, position)), position)
        position += 1
    return out

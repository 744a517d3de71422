"""The edge/device split on tiny random Llama, Qwen2 (with and without sliding layers) and Mistral models:
token-for-token identity with ``model.generate`` at every split layer, positions, batching and sampling."""

from __future__ import annotations

import pytest
import torch
from llm_tiny import FAMILIES, VOCAB, tiny_model

from models.llm.split import DeviceHalf, EdgeHalf, PositionError, sample, split_generate

torch.set_num_threads(1)

PROMPT_LEN = 9
NEW_TOKENS = 16  # prompt + new tokens > every sliding window used, so the window must be honoured


def _prompt(seed: int, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    # eos_token_id=None: no stopping and no suppressed logits, so both sides decode NEW_TOKENS plain argmaxes.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                         pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [2, 4])
def test_split_greedy_equals_generate_at_every_k(family: str, layers: int) -> None:
    model = tiny_model(family, layers=layers, hidden=32 if layers == 2 else 64)
    for seed in range(2):
        ids = _prompt(seed)
        ref = _reference(model, ids)
        assert len(set(ref)) > 1, "a degenerate reference (one repeated token) would prove little"
        for k in range(1, layers + 1):
            got = split_generate(EdgeHalf(model, k), DeviceHalf(model, k), ids, NEW_TOKENS, eos_token_id=None)
            assert got == ref, f"{family} L={layers} k={k} seed={seed}"


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_split_logits_match_the_full_forward_at_every_position(family: str) -> None:
    model = tiny_model(family)
    ids = _prompt(3, length=20)
    with torch.no_grad():
        full = model(ids).logits
    for k in (1, 2, 3):
        edge, device = EdgeHalf(model, k), DeviceHalf(model, k)
        # Prefill 12 rows, then one row at a time: each row's logits equal the monolithic forward's.
        rows = [device.prefill(edge.prefill(ids[:, :12]), 0, all_rows=True)[0]]
        for t in range(12, 20):
            rows.append(device.step(edge.step(ids[0, t], t), t))
        torch.testing.assert_close(torch.cat(rows), full[0], atol=1e-5, rtol=1e-5)


def test_split_layer_range() -> None:
    model = tiny_model("llama", layers=3)
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="out of range"):
            EdgeHalf(model, bad)
        with pytest.raises(ValueError, match="out of range"):
            DeviceHalf(model, bad)
    device = DeviceHalf(model, 3)  # k = L: the device keeps only norm, head and sampling
    assert len(device.slice.layers) == 0 and device.cache.num_layers == 0


def test_device_refuses_positions_that_do_not_continue_its_cache() -> None:
    """A device half that thinks the past is empty must not quietly compute position-0 rotations."""
    model = tiny_model("llama")
    edge, device = EdgeHalf(model, 2), DeviceHalf(model, 2)
    ids = _prompt(0)
    h = edge.prefill(ids)
    with pytest.raises(PositionError):
        device.prefill(h, positions=5)  # the prompt starts at 0
    device.prefill(h, positions=0)
    step = edge.step(7, PROMPT_LEN)
    with pytest.raises(PositionError):
        device.step(step, PROMPT_LEN + 1)  # skips a position
    with pytest.raises(PositionError):
        edge.step(7, PROMPT_LEN)  # the edge already holds this position
    device.reset()
    with pytest.raises(PositionError):
        device.step(step, PROMPT_LEN)  # empty cache: the prompt's rows are missing
    assert device.step is not None and device.cache.length == 0


def test_cache_records_absolute_positions_and_lengths() -> None:
    model = tiny_model("qwen2", layers=4)
    edge, device = EdgeHalf(model, 1), DeviceHalf(model, 1)
    device.prefill(edge.prefill(_prompt(0)))
    device.step(edge.step(5, PROMPT_LEN), PROMPT_LEN)
    for cache, n_layers in ((edge.cache, 1), (device.cache, 3)):
        assert cache.positions.tolist() == list(range(PROMPT_LEN + 1))
        assert len(cache.keys) == n_layers and all(k.shape[2] == PROMPT_LEN + 1 for k in cache.keys)
        assert cache.nbytes() > 0


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2-sliding"])
def test_batched_steps_equal_single_session_steps(family: str) -> None:
    """Sessions with different prompt lengths decode together; each equals its own unbatched run."""
    model = tiny_model(family)
    k = 2
    edge, device = EdgeHalf(model, k), DeviceHalf(model, k)
    prompts = [_prompt(s, length=n) for s, n in ((0, 4), (1, 9), (2, 13))]
    singles = [split_generate(EdgeHalf(model, k), DeviceHalf(model, k), p, 8, eos_token_id=None) for p in prompts]
    edge_caches = [edge.new_cache() for _ in prompts]
    device_caches = [device.new_cache() for _ in prompts]
    tokens, positions = [], []
    for p, ec, dc in zip(prompts, edge_caches, device_caches):
        logits = device.prefill(edge.prefill(p, cache=ec), cache=dc)
        tokens.append(int(sample(logits[0])))
        positions.append(p.shape[1])
    outs = [[t] for t in tokens]
    for _ in range(7):
        h = edge.step_batch(tokens, positions, edge_caches)
        assert h.shape == (3, 1, model.config.hidden_size)
        tokens = sample(device.step_batch(h, positions, device_caches)).tolist()
        positions = [p + 1 for p in positions]
        for out, t in zip(outs, tokens):
            out.append(t)
    assert outs == singles
    assert [c.length for c in edge_caches] == [p.shape[1] + 7 for p in prompts]


def test_sample_greedy_and_seeded() -> None:
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0], [3.0, 0.0, 0.0, 0.0]])
    assert sample(logits).tolist() == [1, 0]
    assert int(sample(logits[0])) == 1
    draws = [sample(logits, 1.0, 1.0, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    gen = torch.Generator().manual_seed(0)
    many = torch.stack([sample(logits, 1.0, 1.0, gen) for _ in range(300)])
    assert set(many[:, 0].tolist()) >= {0, 1, 2}, "temperature 1 must draw more than the argmax"


def test_top_p_keeps_only_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 1.0, 0.7, gen)) for _ in range(400)}
    assert drawn == {0, 1}  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 form the nucleus
    assert {int(sample(logits, 1.0, 0.01, gen)) for _ in range(50)} == {0}
    with pytest.raises(ValueError):
        sample(logits, -1.0)
    with pytest.raises(ValueError):
        sample(logits, 1.0, 0.0)


def test_fp16_transfer_changes_little_on_a_random_model() -> None:
    """Not the embedded-model criterion (see test_llm_embedded), just that a float16 row is accepted."""
    model = tiny_model("llama")
    edge, device = EdgeHalf(model, 2), DeviceHalf(model, 2)
    h = edge.prefill(_prompt(0))
    exact = device.prefill(h, 0)
    device.reset()
    rounded = device.prefill(h.half(), 0)
    assert rounded.dtype == torch.float32
    torch.testing.assert_close(rounded, exact, atol=1e-2, rtol=1e-2)

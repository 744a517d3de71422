"""The channel blocks (:mod:`radio`): one physics for the emulator, training and benchmarks; one validation
for REST, gRPC and the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from codec.train_jscc import torch_channel
from models.channel import apply_channel
from radio import CHANNELS, ChannelError, ChannelSpec, build_block, channel_names, is_noiseless
from radio.link import Link
from wire.payload import EncodedPayload, TensorInfo


def _symbols(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g))


def _emulator(model: str, snr_db: float, x: torch.Tensor, seed: int) -> torch.Tensor:
    """What the channel emulator delivers for one request carrying ``x`` as analog symbols."""
    payload = EncodedPayload("analog", [TensorInfo("latents", (int(x.numel()) * 2,))], {}, symbols=x.numpy())
    spec = ChannelSpec.create(model, snr_db=snr_db, seed=seed)
    return torch.from_numpy(Link().send(spec, payload, torch.Generator().manual_seed(seed)).payload.symbols)


@pytest.mark.parametrize("model", ["awgn", "rayleigh"])
def test_emulator_and_decoder_training_path_are_the_same_channel(model: str) -> None:
    """Same seed and SNR: the emulator's link and the robust decoder's training channel deliver the same
    symbols (the latents' value pairs are the complex symbols)."""
    x = _symbols(1, 512, seed=3)
    latents = torch.stack([x.real, x.imag], dim=-1).reshape(1, 4, 16, 16)
    trained = apply_channel(latents, 4.0, model, generator=torch.Generator().manual_seed(9))
    trained = torch.complex(trained.reshape(1, -1)[:, 0::2], trained.reshape(1, -1)[:, 1::2])
    emulated = _emulator(model, 4.0, x.reshape(-1), seed=9)
    torch.testing.assert_close(trained.reshape(-1), emulated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["awgn", "rayleigh"])
@pytest.mark.parametrize("snr_db", [-5.0, 10.0])
def test_emulator_and_jscc_training_noise_statistics_agree(model: str, snr_db: float) -> None:
    """The JSCC training channel (mixed AWGN/Rayleigh batches) and the emulator: same error power after
    the receiver at the same SNR, over 256 images of 512 symbols (2048 fading blocks)."""
    x = _symbols(256, 512, seed=1)
    rayleigh = torch.full((256,), model == "rayleigh")
    trained = torch_channel(x, torch.full((256,), snr_db), rayleigh, torch.Generator().manual_seed(5))
    emulated = torch.stack([_emulator(model, snr_db, row, seed=100 + i) for i, row in enumerate(x)])
    err_t = (trained - x).abs().pow(2).mean()
    err_e = (emulated - x).abs().pow(2).mean()
    assert abs(float(err_t / err_e) - 1.0) < 0.1, (float(err_t), float(err_e))


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 20.0])
def test_awgn_measured_snr_matches_the_request(snr_db: float) -> None:
    x = _symbols(4, 20_000)
    out = build_block("awgn", {"snr_db": snr_db}).transmit(x, torch.Generator().manual_seed(0))
    measured = 10 * torch.log10(out.signal_power / (out.received - x).abs().pow(2).mean(dim=1, keepdim=True))
    assert torch.all((measured - snr_db).abs() < 0.1), measured


def test_rician_gain_power_is_one_and_k_sets_its_spread() -> None:
    g = torch.Generator().manual_seed(0)
    low = build_block("rician", {"snr_db": 10.0, "k_factor": 0.0, "coherence_symbols": 1}).draw_gains(1, 50_000, g, "cpu")
    high = build_block("rician", {"snr_db": 10.0, "k_factor": 100.0, "coherence_symbols": 1}).draw_gains(1, 50_000, g,
                                                                                                         "cpu")
    for h in (low, high):
        assert abs(float(h.abs().pow(2).mean()) - 1.0) < 0.03
    assert float(high.abs().var()) < 0.1 * float(low.abs().var())


def test_fading_is_constant_over_coherence_blocks() -> None:
    h = build_block("rayleigh", {"snr_db": 0.0, "coherence_symbols": 64}).draw_gains(2, 200, None, "cpu")
    assert torch.all(h[:, :64] == h[:, :1]) and not torch.all(h[:, 64:128] == h[:, :1])


def test_ideal_delivers_unchanged_and_is_noiseless() -> None:
    x = _symbols(2, 100)
    torch.testing.assert_close(build_block("ideal").apply_analog(x, torch.Generator().manual_seed(0)), x)
    assert is_noiseless("ideal") and not is_noiseless("awgn")


def test_blocks_are_differentiable() -> None:
    x = _symbols(2, 64).requires_grad_(True)
    y = build_block("rayleigh", {"snr_db": 5.0}).apply_analog(x, torch.Generator().manual_seed(0))
    y.abs().pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("values, field", [
    ({"model": "ideal", "snr_db": 5.0}, "channel.snr_db"),          # SNR on a noiseless channel
    ({"model": "awgn"}, "channel.snr_db"),                           # no hidden default SNR
    ({"model": "awgn", "snr_db": "5"}, "channel.snr_db"),            # a string where a number goes
    ({"model": "awgn", "snr_db": 99.0}, "channel.snr_db"),
    ({"model": "awgn", "snr_db": 5.0, "k_factor": 2.0}, "channel.k_factor"),
    ({"model": "rician", "snr_db": 5.0, "coherence_symbols": 1.5}, "channel.coherence_symbols"),
    ({"model": "awgn", "snr_db": 5.0, "code_rate": 0.5}, "channel.code_rate"),  # a rate without LDPC
    ({"model": "awgn", "snr_db": 5.0, "modulation": "8psk"}, "channel.modulation"),
    ({"model": "awgn", "snr_db": float("nan")}, "channel.snr_db"),
    ({"model": "warp"}, "channel.model"),
])
def test_invalid_specs_name_their_field(values: dict, field: str) -> None:
    with pytest.raises(ChannelError, match=f"^{field}:"):
        ChannelSpec.from_mapping(values)


@pytest.mark.parametrize("model", channel_names())
def test_spec_round_trips_through_the_wire(model: str) -> None:
    values = {} if is_noiseless(model) else {"snr_db": 3.5}
    spec = ChannelSpec.create(model, **values, bandwidth_hz=2e6, delay_ms=4.0, seed=7, fec="ldpc", code_rate=0.75)
    assert ChannelSpec.from_proto(spec.to_proto()) == spec
    assert ChannelSpec.from_mapping(spec.to_mapping()) == spec


def test_registry_refuses_a_second_channel_of_the_same_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        CHANNELS.register("awgn")(type("Again", (CHANNELS.get("awgn"),), {}))
    assert channel_names()[:4] == ["ideal", "awgn", "rayleigh", "rician"]


def test_link_reuses_its_ldpc_chain_across_requests() -> None:
    link = Link()
    payload = EncodedPayload("digital", [TensorInfo("x", (64,))], {}, data=bytes(range(64)))
    spec = ChannelSpec.create("awgn", snr_db=10.0, fec="ldpc")
    link.send(spec, payload, torch.Generator().manual_seed(0))
    chains = dict(link._chains)
    link.send(dataclasses.replace(spec), payload, torch.Generator().manual_seed(1))
    assert link._chains == chains and len(chains) == 1
    assert np.frombuffer(link.send(spec, payload).payload.data, np.uint8).tolist() == list(range(64))


def test_doppler_correlates_consecutive_fading_blocks() -> None:
    from radio.channels.rayleigh import block_correlation

    rho = block_correlation(1616.0, 64, 1e6)
    assert 0.85 < rho < 0.95
    spec = ChannelSpec.create("rayleigh", snr_db=10.0, doppler_hz=1616.0, coherence_symbols=64, bandwidth_hz=1e6)
    h = spec.block().draw_gains(200, 64 * 50, torch.Generator().manual_seed(0), "cpu")[:, ::64]
    lag1 = (h[:, 1:] * h[:, :-1].conj()).mean().real / h.abs().pow(2).mean()
    assert abs(float(lag1) - rho) < 0.05
    still = ChannelSpec.create("rayleigh", snr_db=10.0).block().draw_gains(200, 64 * 50, None, "cpu")[:, ::64]
    assert abs(float((still[:, 1:] * still[:, :-1].conj()).mean().real)) < 0.05


def test_gilbert_elliott_losses_come_in_bursts() -> None:
    spec = ChannelSpec.create("gilbert-elliott", snr_db=10.0, p_enter_bad=0.05, p_leave_bad=0.2)
    bad = (spec.block().draw_gains(50, 64 * 400, torch.Generator().manual_seed(1), "cpu")[:, ::64].abs() < 0.5)
    share = float(bad.float().mean())
    assert abs(share - 0.05 / 0.25) < 0.03                  # the chain's stationary share of bad blocks
    runs = bad[:, 1:] & bad[:, :-1]                         # P(bad | bad) = 1 - p_leave = 0.8, not 0.2
    assert float(runs.float().sum() / bad[:, :-1].float().sum()) > 0.7


def test_ldpc_over_bursts_erases_whole_blocks_and_delivers_the_rest() -> None:
    data = bytes(range(256)) * 12
    payload = EncodedPayload("digital", [TensorInfo("x", (len(data),))], {}, data=data)
    spec = ChannelSpec.create("gilbert-elliott", snr_db=12.0, p_enter_bad=0.2, p_leave_bad=0.3, fec="ldpc",
                              coherence_symbols=256)
    res = Link().send(spec, payload, torch.Generator().manual_seed(3))
    assert res.erased, "some code blocks fall in a burst"
    kept = bytearray(res.payload.data)
    for start, end in res.erased:
        kept[start:end] = data[start:end]
    assert bytes(kept) == data  # everything outside the erased ranges arrived intact


@pytest.mark.parametrize("model", ["awgn", "rayleigh"])
def test_estimated_csi_costs_pilots_and_is_close_to_the_truth(model: str) -> None:
    """Pilots cost channel uses; the receiver's SNR estimate scatters around the true SNR; equalising with
    the estimate is a little worse than with the truth (never better on average)."""
    x = _symbols(1, 4096, seed=4).reshape(-1) / 2 ** 0.5
    payload = EncodedPayload("analog", [TensorInfo("x", (8192,))], {}, symbols=x.numpy())
    link = Link()
    errors = {}
    for csi in ("perfect", "estimated"):
        spec = ChannelSpec.create(model, snr_db=10.0, csi=csi, pilots=16)
        runs = [link.send(spec, payload, torch.Generator().manual_seed(i)) for i in range(20)]
        errors[csi] = np.mean([np.mean(np.abs(r.payload.symbols - x.numpy()) ** 2) for r in runs])
        if csi == "estimated":
            blocks = 1 if model == "awgn" else 4096 // 64
            assert all(r.pilot_symbols == 16 * blocks and r.symbols == 4096 + 16 * blocks for r in runs)
            assert abs(np.mean([r.snr_estimate_db for r in runs]) - 10.0) < 1.5
        else:
            assert all(r.pilot_symbols == 0 and r.snr_estimate_db == 10.0 for r in runs)
    assert errors["estimated"] >= 0.95 * errors["perfect"]


def test_control_uplink_retransmits_until_its_crc_passes() -> None:
    link = Link()
    token = (31999).to_bytes(4, "little")
    clean = link.send_control(ChannelSpec.create("awgn", snr_db=10.0), token, torch.Generator().manual_seed(0))
    assert clean.data == token and clean.attempts == 1
    hard = [link.send_control(ChannelSpec.create("awgn", snr_db=-3.0), token, torch.Generator().manual_seed(i))
            for i in range(10)]
    assert all(r.data == token for r in hard) and any(r.attempts > 1 for r in hard)
    assert all(r.symbols == r.attempts * clean.symbols for r in hard)  # every attempt costs channel uses
    lost = link.send_control(ChannelSpec.create("awgn", snr_db=-15.0), token, torch.Generator().manual_seed(0),
                             max_attempts=3)
    assert lost.data is None and lost.attempts == 3

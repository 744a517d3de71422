"""Differentiable-free torch emulation of the testbed's "analog" latent channel.

Why here: the robust decoder must be trained on exactly what the testbed's channel does to
analog payloads, so the model is kept bit-for-bit in this documented form:

* each image's latent tensor is flattened; consecutive value pairs form complex symbols
  ``x = v[2k] + j v[2k+1]`` (a zero is appended if the count is odd);
* ``P = mean(|x|^2)`` per image; noise is complex Gaussian with power
  ``N0 = P / 10^(snr_db/10)`` (each of real/imag has variance N0/2);
* AWGN: ``y = x + n`` and the receiver uses ``y`` as is;
* Rayleigh: block fading ``h ~ CN(0, 1)`` constant over blocks of 64 symbols,
  ``y = h x + n``; the receiver knows ``h`` and applies the MMSE equaliser
  ``x_hat = conj(h) y / (|h|^2 + N0 / P)``.
"""

from __future__ import annotations

from typing import Final, Literal

import torch

ChannelKind = Literal["awgn", "rayleigh"]
FADING_BLOCK: Final[int] = 64


def _to_symbols(latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, ...) real -> (B, S) complex symbols; returns also the real value count."""
    flat = latents.reshape(latents.shape[0], -1).float()
    n = flat.shape[1]
    if n % 2:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], dim=1)
    return torch.complex(flat[:, 0::2], flat[:, 1::2]), n


def _from_symbols(sym: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    flat = torch.stack([sym.real, sym.imag], dim=-1).reshape(sym.shape[0], -1)[:, :n]
    return flat.reshape(like.shape).to(like.dtype)


def _complex_normal(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """CN(0, 1) samples (drawn on CPU when a CPU generator is given, for reproducibility)."""
    gen_device = generator.device if generator is not None else device
    re = torch.randn(shape, generator=generator, device=gen_device)
    im = torch.randn(shape, generator=generator, device=gen_device)
    return (torch.complex(re, im) / 2**0.5).to(device)


def apply_channel(
    latents: torch.Tensor,
    snr_db: float | torch.Tensor,
    kind: ChannelKind = "awgn",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Send a batch of latents through the channel and return what the receiver decodes.

    ``snr_db`` is a float or a per-image tensor of shape (B,). The output has the input's
    shape and dtype. See the module docstring for the exact model.
    """
    if kind not in ("awgn", "rayleigh"):
        raise ValueError(f"unknown channel kind {kind!r}")
    x, n = _to_symbols(latents)
    b, s = x.shape
    snr = torch.as_tensor(snr_db, dtype=torch.float32, device=x.device).reshape(-1)
    if snr.numel() == 1:
        snr = snr.expand(b)
    if snr.numel() != b:
        raise ValueError("snr_db must be a scalar or have one value per image")
    power = x.abs().pow(2).mean(dim=1, keepdim=True)  # (B, 1)
    n0 = power / torch.pow(10.0, snr[:, None] / 10.0)
    noise = _complex_normal((b, s), x.device, generator) * n0.sqrt()
    if kind == "awgn":
        return _from_symbols(x + noise, n, latents)
    blocks = -(-s // FADING_BLOCK)
    h = _complex_normal((b, blocks), x.device, generator)
    h = h.repeat_interleave(FADING_BLOCK, dim=1)[:, :s]
    y = h * x + noise
    ratio = n0 / power.clamp_min(1e-12)
    x_hat = h.conj() * y / (h.abs().pow(2) + ratio)
    return _from_symbols(x_hat, n, latents)


def measured_snr_db(sent: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """Per-image ``10 log10(P_signal / P_error)`` (useful to verify the AWGN channel)."""
    x, _ = _to_symbols(sent)
    y, _ = _to_symbols(received)
    p = x.abs().pow(2).mean(dim=1)
    e = (y - x).abs().pow(2).mean(dim=1)
    return 10 * torch.log10(p / e)

"""A variable-rate learned coder: one mean-scale hyperprior for every quality, selected by gain vectors.

Why: issue 13 asks for coders of real capacity, trained until the curve stops moving, on a 2-core machine.
Four separately trained qualities cost four trainings; a *gained* model (Cui et al., "Asymmetric Gained Deep
Image Compression with Continuous Rate Adaptation", CVPR 2021) learns one set of transforms plus, per quality
``q``, a channel gain ``g_q`` applied to the analysis output before quantisation and an inverse gain ``g'_q``
applied before synthesis. A larger gain means a finer effective quantisation step, hence a higher rate. Each
training step draws a quality per sample and weighs its distortion with that quality's lambda, so the whole
ladder is trained at the cost of one model.

The entropy model is CompressAI's mean-scale hyperprior (``MeanScaleHyperprior``: the family that measured best
per bit in ``bench/results/rate.md``); the transforms are the compact 4x / 16x ones of :mod:`codec.learned`,
at a larger width (default N = 64, M = 96, issue 16's "scale to the machine").

A quality is bound at load time (:meth:`GainedMeanScale.at_quality`), so the coding functions of
:mod:`codec.learned` see an object with the usual ``compress`` / ``forward`` and a ``decode_padded``.
"""

from __future__ import annotations

from typing import Any

import torch
from compressai.models import MeanScaleHyperprior
from torch import nn

#: Rate-distortion trade-offs of the four qualities (CompressAI's q1, q3, q5, q7 image lambdas, as the ladder).
GAINED_LAMBDAS: tuple[float, ...] = (0.0018, 0.0067, 0.025, 0.0932)


class GainedMeanScale(MeanScaleHyperprior):
    """Mean-scale hyperprior with per-quality gain / inverse-gain vectors on the latent ``y``."""

    def __init__(self, N: int, M: int, levels: int, g_a: nn.Module, g_s: nn.Module, h_a: nn.Module,
                 h_s: nn.Module) -> None:
        super().__init__(N, M)
        self.g_a, self.g_s, self.h_a, self.h_s = g_a, g_s, h_a, h_s
        self.levels = levels
        # Initialised as a geometric ladder: the quantisation step of quality q scales as 1/sqrt(lambda_q)
        # (distortion ~ step^2), so training starts with the qualities already apart.
        lams = torch.tensor(GAINED_LAMBDAS[:levels] if levels <= len(GAINED_LAMBDAS) else
                            [GAINED_LAMBDAS[-1]] * levels, dtype=torch.float32)
        log_gain = 0.5 * torch.log(lams / lams[-1])
        self.log_gain = nn.Parameter(log_gain.view(levels, 1).repeat(1, M))
        self.log_inv_gain = nn.Parameter(-log_gain.view(levels, 1).repeat(1, M))

    def _gains(self, q: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain, inverse gain), each (B or 1, M, 1, 1), for quality indices ``q`` (0-based)."""
        idx = torch.as_tensor(q, dtype=torch.long).reshape(-1)
        if int(idx.min()) < 0 or int(idx.max()) >= self.levels:
            raise ValueError(f"quality index {idx.tolist()} outside [0, {self.levels})")
        return (self.log_gain[idx].exp()[..., None, None], self.log_inv_gain[idx].exp()[..., None, None])

    def forward(self, x: torch.Tensor, q: torch.Tensor | int = 0) -> dict[str, Any]:  # type: ignore[override]
        gain, inv_gain = self._gains(q)
        y = self.g_a(x) * gain
        z = self.h_a(y)
        z_hat, z_likelihoods = self.entropy_bottleneck(z)
        scales_hat, means_hat = self.h_s(z_hat).chunk(2, 1)
        y_hat, y_likelihoods = self.gaussian_conditional(y, scales_hat, means=means_hat)
        return {"x_hat": self.g_s(y_hat * inv_gain), "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    def compress(self, x: torch.Tensor, q: int = 0) -> dict[str, Any]:  # type: ignore[override]
        gain, _ = self._gains(q)
        y = self.g_a(x) * gain
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z)
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.size()[-2:])
        scales_hat, means_hat = self.h_s(z_hat).chunk(2, 1)
        indexes = self.gaussian_conditional.build_indexes(scales_hat)
        y_strings = self.gaussian_conditional.compress(y, indexes, means=means_hat)
        return {"strings": [y_strings, z_strings], "shape": z.size()[-2:]}

    def decode_padded(self, strings: list[list[bytes]], z_shape: tuple[int, int], q: int = 0) -> torch.Tensor:
        """Planes of the padded size from ``[y strings, z strings]`` (no clamp: features are not pixels)."""
        _, inv_gain = self._gains(q)
        z_hat = self.entropy_bottleneck.decompress(strings[1], z_shape)
        scales_hat, means_hat = self.h_s(z_hat).chunk(2, 1)
        indexes = self.gaussian_conditional.build_indexes(scales_hat)
        y_hat = self.gaussian_conditional.decompress(strings[0], indexes, means=means_hat)
        return self.g_s(y_hat * inv_gain)

    def at_quality(self, q: int) -> "GainedAtQuality":
        return GainedAtQuality(self, q)


class GainedAtQuality(nn.Module):
    """One quality of a :class:`GainedMeanScale`, with the single-quality interface of the other coders."""

    def __init__(self, model: GainedMeanScale, q: int) -> None:
        super().__init__()
        if not 0 <= q < model.levels:
            raise ValueError(f"quality index {q} outside [0, {model.levels})")
        self.model, self.q = model, q

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.model(x, self.q)

    def compress(self, x: torch.Tensor) -> dict[str, Any]:
        return self.model.compress(x, self.q)

    def decode_padded(self, strings: list[list[bytes]], z_shape: tuple[int, int]) -> torch.Tensor:
        return self.model.decode_padded(strings, z_shape, self.q)


def per_sample_bpfp(likelihoods: dict[str, torch.Tensor], points_per_sample: int) -> torch.Tensor:
    """Estimated bits per feature point of each sample of a batch, (B,)."""
    bits = sum(-torch.log2(v.clamp_min(1e-9)).flatten(1).sum(1) for v in likelihoods.values())
    return bits / points_per_sample


def lambda_of(q: torch.Tensor) -> torch.Tensor:
    """The training lambda of each 0-based quality index."""
    return torch.tensor(GAINED_LAMBDAS, dtype=torch.float32)[q]


def quality_count() -> int:
    return len(GAINED_LAMBDAS)

"""Image quality of a received image against the clean decode: PSNR and MS-SSIM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

# The standard MS-SSIM needs 5 scales and images over 160 px; pytorch_msssim asserts on that even when
# fewer weights are given. Small images (64 px here) use as many scales as fit, with the leading standard
# weights renormalised and a 7-pixel window, computed with pytorch_msssim's own per-scale SSIM.
_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1]; capped at 100 dB for identical images."""
    mse = float(torch.mean((image.float() - reference.float()) ** 2))
    return 100.0 if mse <= 1e-10 else 10.0 * math.log10(1.0 / mse)


def ms_ssim_score(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean MS-SSIM of (B, 3, H, W) images in [0, 1], with as many scales as the size allows (≤ 5)."""
    x, y = image.float(), reference.float()
    side = min(x.shape[-2:])
    win_size = 11 if side > 160 else 7
    levels = 5
    while levels > 1 and side <= (win_size - 1) * 2 ** (levels - 1):
        levels -= 1
    if side < win_size:
        raise ValueError(f"images of {side} px are too small for MS-SSIM (window {win_size})")
    weights = torch.tensor(_MS_SSIM_WEIGHTS[:levels])
    weights = weights / weights.sum()
    win = _fspecial_gauss_1d(win_size, 1.5).repeat([x.shape[1], 1, 1, 1])
    factors = []
    for level in range(levels):
        ssim_per_channel, cs = _ssim(x, y, data_range=1.0, win=win, size_average=False, K=(0.01, 0.03))
        if level < levels - 1:
            factors.append(torch.relu(cs))
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    factors.append(torch.relu(ssim_per_channel))
    stacked = torch.stack(factors, dim=0)  # (levels, B, C)
    score = torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)
    return float(score.mean())

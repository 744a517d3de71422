"""Small CNN judge for the shapes data set, and a Fréchet distance on its features.

Why: generated images must be scored automatically. The classifier predicts
(shape, colour, background) and doubles as the feature extractor of
:func:`shapes_frechet_distance`. That distance is FID-*style* only: it uses this
classifier's 128-d penultimate features, NOT Inception-v3, so its values are not comparable
with published FID numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.shapes import BACKGROUNDS, COLORS, SHAPES

CONFIG_NAME: Final[str] = "config.json"
WEIGHTS_NAME: Final[str] = "model.safetensors"


class ShapesClassifier(nn.Module):
    """Conv net: 64x64 RGB in [-1, 1] -> logits for shape (3), colour (6), background (3)."""

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim, "_class_name": "ShapesClassifier"}

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(3, width),  # 32x32
            block(width, width * 2),  # 16x16
            block(width * 2, width * 4),  # 8x8
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width * 4, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.shape_head = nn.Linear(feature_dim, len(SHAPES))
        self.color_head = nn.Linear(feature_dim, len(COLORS))
        self.background_head = nn.Linear(feature_dim, len(BACKGROUNDS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits ``(shape, color, background)`` for images in [-1, 1]."""
        f = self.features(images)
        return self.shape_head(f), self.color_head(f), self.background_head(f)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features (N, feature_dim) for images in [-1, 1]."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = [self.features(chunk.to(dev)).float().cpu() for chunk in images.split(batch_size)]
        self.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[tuple[str, str, str]]:
        """Predicted ``(color, shape, background)`` names (caption order) for images in [-1, 1]."""
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        preds = []
        for chunk in images.split(256):
            s, c, b = self(chunk.to(dev))
            preds += [
                (COLORS[ci], SHAPES[si], BACKGROUNDS[bi])
                for si, ci, bi in zip(s.argmax(1).tolist(), c.argmax(1).tolist(), b.argmax(1).tolist())
            ]
        self.train(was_training)
        return preds

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``path``."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ShapesClassifier:
        """Load a classifier saved by :meth:`save_pretrained` (in eval mode)."""
        src = Path(path)
        cfg = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8"))
        model = cls(width=int(cfg["width"]), feature_dim=int(cfg["feature_dim"]))
        model.load_state_dict(load_file(str(src / WEIGHTS_NAME)))
        return model.eval()


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via eigendecomposition."""
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (rows = samples).

    ``tr(sqrtm(Ca Cb))`` is computed as ``sum(sqrt(eig(sqrt(Ca) Cb sqrt(Ca))))``, which has the
    same eigenvalues but is symmetric, so it is stable without scipy's general sqrtm.
    """
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a = np.atleast_2d(np.cov(feats_a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(feats_b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)


def shapes_frechet_distance(
    classifier: ShapesClassifier, images_a: torch.Tensor, images_b: torch.Tensor
) -> float:
    """"Shapes-FD": Fréchet distance of the classifier's penultimate features of two image
    sets in [-1, 1]. Not Inception FID; only comparable across runs using the same classifier."""
    fa = classifier.embed(images_a).double().numpy()
    fb = classifier.embed(images_b).double().numpy()
    return frechet_distance(fa, fb)

"""Bootstrap intervals shared by the benchmarks (``snr``, ``llm``, ``universal``): one resampling recipe, so
every "95 % interval" in ``bench/results`` means the same thing."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_ci(values: Sequence[float] | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                 ) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean (one value: a point)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float(v.mean()), float(v.mean())
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float]:
    """Mean of b − a over the same items (same images and noise, same prompts), with its paired 95 % interval."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    lo, hi = bootstrap_ci(d, resamples)
    return float(d.mean()), lo, hi

"""The digital envelope of ``meg bench snr`` and the scheme names ``auto`` reads back from its table."""

from __future__ import annotations

import numpy as np
import pytest

from bench.snr import envelope_rows
from bench.stats import bootstrap_ci, paired_difference
from codec.adaptation import scheme_of


def test_scheme_names_parse_to_codec_link_and_quality() -> None:
    assert scheme_of("gained-native q3+LDPC 64QAM r3/4") == (
        "gained-native", {"modulation": "64qam", "fec": "ldpc", "code_rate": 0.75}, {"learned_quality": "3"})
    assert scheme_of("hyperprior+LDPC QPSK r1/2") == ("hyperprior", {"modulation": "qpsk", "fec": "ldpc",
                                                                    "code_rate": 0.5}, {})
    assert scheme_of("raw-fp16 uncoded QPSK") == ("raw-fp16", {"modulation": "qpsk", "fec": "none"}, {})
    assert scheme_of("E2E-MEG (fixed merge map)") == ("e2e-meg-fixed", {}, {})
    assert scheme_of("digital envelope ≤256 uses") is None  # a summary of several schemes, not one


def _row(name: str, snr: float, uses: float, psnr: float) -> dict[str, object]:
    return {"scheme": name, "kind": "digital", "channel": "awgn", "snr_db": snr, "channel_uses_per_image": uses,
            "psnr_db": psnr, "config": name, "_envelope": True}


def test_envelope_takes_the_best_configuration_that_fits_each_budget() -> None:
    rows = [_row("a", 0.0, 200, 10.0), _row("b", 0.0, 400, 20.0), _row("a", 10.0, 200, 25.0),
            _row("b", 10.0, 400, 30.0), {**_row("fixed", 10.0, 100, 99.0), "_envelope": False}]
    env = {(r["scheme"], r["snr_db"]): r["config"] for r in envelope_rows(rows, (256, 512))}
    assert env == {("digital envelope ≤256 uses", 0.0): "a", ("digital envelope ≤256 uses", 10.0): "a",
                   ("digital envelope ≤512 uses", 0.0): "b", ("digital envelope ≤512 uses", 10.0): "b"}


def test_bootstrap_intervals_cover_the_mean_and_pair_differences() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(20.0, 3.0, 216)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi and 0.4 < hi - lo < 1.2  # about ±1.96·3/√216
    # A constant shift on the same images is detected exactly, however noisy each image is.
    d, dlo, dhi = paired_difference(x, x + 0.2)
    assert d == pytest.approx(0.2) and dlo == pytest.approx(0.2) and dhi == pytest.approx(0.2)

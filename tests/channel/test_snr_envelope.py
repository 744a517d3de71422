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


def test_digital_cliffs_are_measured_again_on_a_half_db_grid() -> None:
    from bench.snr import Scheme, cliff_tasks

    digital = Scheme("d", "hyperprior", "tiny_decoder", "ldpc")
    analog = Scheme("a", "jscc", "robust_decoder", "analog")
    rows = [{"scheme": "d", "channel": "awgn", "snr_db": s, "psnr_db": p}
            for s, p in ((0.0, 9.0), (5.0, 9.5), (10.0, 27.0), (15.0, 27.0))]
    rows += [{"scheme": "d", "channel": "rayleigh", "snr_db": s, "psnr_db": p} for s, p in ((0.0, 20.0), (5.0, 21.0))]
    rows += [{"scheme": "a", "channel": "awgn", "snr_db": s, "psnr_db": p} for s, p in ((0.0, 9.0), (5.0, 27.0))]
    tasks = cliff_tasks([digital, analog], rows, step_db=0.5)
    # Only the digital scheme, only where it jumps (the Rayleigh curve moves by 1 dB: no cliff), inside the jump.
    assert [(t.scheme.name, t.channel, t.grid) for t in tasks] == [("d", "awgn", "cliff")]
    assert tasks[0].snrs == tuple(5.0 + 0.5 * k for k in range(1, 10))


def test_auto_breaks_near_ties_by_fewer_channel_uses() -> None:
    from codec.adaptation import AdaptationTable, Scheme as TableScheme

    grid = (0.0, 20.0)
    big = TableScheme("big", "raw-fp16", "digital", 8192, grid, (9.0, 27.45), {"modulation": "qpsk", "fec": "none"})
    small = TableScheme("small", "gained-native", "digital", 400, grid, (9.0, 27.40),
                        {"modulation": "16qam", "fec": "ldpc", "code_rate": 0.75})
    worse = TableScheme("worse", "jscc", "analog", 256, grid, (12.0, 26.0))
    table = AdaptationTable("psnr_db", {"awgn": [big, small, worse]}, margin_db=1.0)
    assert table.choose("awgn", 30.0).scheme.name == "small"  # 0.05 dB is not worth 20× the airtime
    assert table.choose("awgn", -5.0).scheme.name == "worse"  # below the cliff the analog scheme wins


def test_auto_weighs_a_cliff_by_how_far_the_estimate_may_stray(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from codec.adaptation import AdaptationTable, Scheme as TableScheme

    grid = (0.0, 9.5, 10.0, 20.0)
    cliff = TableScheme("cliff", "gained-native", "digital", 300, grid, (9.0, 9.0, 27.0, 27.0),
                        {"modulation": "16qam", "fec": "ldpc", "code_rate": 0.5})
    smooth = TableScheme("smooth", "jscc", "analog", 512, grid, (20.0, 25.0, 25.2, 27.0))
    sure = AdaptationTable("psnr_db", {"awgn": [cliff, smooth]}, margin_db=0.0, estimate_std_db={"awgn": 0.1})
    unsure = AdaptationTable("psnr_db", {"awgn": [cliff, smooth]}, margin_db=0.0, estimate_std_db={"awgn": 2.0})
    # Half a dB above the cliff: a precise estimate takes the digital scheme, a rough one the analog scheme ...
    assert sure.choose("awgn", 10.5).scheme.name == "cliff"
    assert unsure.choose("awgn", 10.5).scheme.name == "smooth" and "±2 dB" in unsure.choose("awgn", 10.5).reason
    # ... far above the cliff both take it, and with perfect CSI (no estimate) there is no spread at all.
    assert unsure.choose("awgn", 17.0).scheme.name == "cliff"
    assert unsure.choose("awgn", 10.5, estimated=False).scheme.name == "cliff"
    # The spread travels with the table.
    saved = tmp_path / "adaptation.json"
    saved.write_text(unsure.to_json())
    assert AdaptationTable.load(saved).estimate_std_db == {"awgn": 2.0}

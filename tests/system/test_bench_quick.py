"""``meg bench snr`` and ``meg bench rate`` in their smoke modes, through the CLI, into a temporary folder:
they finish, write CSV + PNG + markdown, and the numbers have the shape the full runs report."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import rate as rate_bench
from bench import snr as snr_bench
from codec.image_sets import image_set_dir
from models import DEFAULT_MODEL_DIR

#: The embedded model's image codec set, where its JSCC links live.
PACKAGE_WEIGHTS = image_set_dir(DEFAULT_MODEL_DIR)

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.skipif(not (REPO / "models" / "shapes_v1" / "metrics.json").is_file(),
                                reason="the benchmarks need the embedded model family models/shapes_v1")


def run_cli(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "meg_cli.main", "bench", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bench_snr_smoke(tmp_path: Path) -> None:
    run_cli("snr", "--smoke", "--out", str(tmp_path))
    for name in ("snr.csv", "snr.png", "snr.md"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "snr.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(tmp_path / "snr.csv")
    assert list(rows[0]) == list(snr_bench.CSV_COLUMNS)
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    expected = ["raw-fp16 uncoded QPSK", "hyperprior+LDPC QPSK r1/2", "hyperprior+LDPC 16QAM r2/3", "MEG (analog)"]
    expected += [label for model, label in (("jscc_full", "JSCC (no merge)"), ("jscc_e2e", "E2E-MEG"))
                 if (PACKAGE_WEIGHTS / f"{model}.safetensors").is_file()]
    assert schemes == expected
    n_cells = len(snr_bench.CHANNELS) * len(snr_bench.SMOKE_SNRS_DB)
    assert len(rows) == len(schemes) * n_cells
    for r in rows:
        assert int(r["n_images"]) == snr_bench.SMOKE_IMAGES
        assert 0 < float(r["psnr_db"]) < 100 and 0 <= float(r["ms_ssim"]) <= 1
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["erased_fraction"]) <= 1
        assert float(r["symbols_per_image"]) > 0 and math.isfinite(float(r["fd"]))

    def row(scheme: str, channel: str, snr_db: float) -> dict[str, str]:
        return next(r for r in rows if r["scheme"] == scheme and r["channel"] == channel
                    and float(r["snr_db"]) == snr_db)

    # The digital cliff: at -5 dB every image is lost (and concealed), at 10 dB on AWGN none is.
    for scheme in expected[1:3]:
        assert float(row(scheme, "awgn", -5.0)["erased_fraction"]) == 1.0
        assert float(row(scheme, "awgn", 10.0)["erased_fraction"]) == 0.0
        assert float(row(scheme, "awgn", 10.0)["psnr_db"]) > float(row(scheme, "awgn", -5.0)["psnr_db"]) + 5
    # A higher-rate code and modulation needs fewer channel uses for the same bits.
    assert float(row(expected[2], "awgn", 10.0)["symbols_per_image"]) < \
        float(row(expected[1], "awgn", 10.0)["symbols_per_image"])
    # The analog link degrades instead: it still beats the concealed digital image at -5 dB.
    assert float(row("MEG (analog)", "awgn", -5.0)["psnr_db"]) > float(row(expected[1], "awgn", -5.0)["psnr_db"])
    md = (tmp_path / "snr.md").read_text()
    assert "## AWGN" in md and "## RAYLEIGH" in md and "## Findings" in md and "meg bench snr --smoke" in md


def test_bench_rate_smoke(tmp_path: Path) -> None:
    run_cli("rate", "--smoke", "--out", str(tmp_path))
    for name in ("rate.csv", "rate.png", "rate.md"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "rate.png").read_bytes()[:8] == PNG_MAGIC
    rows = read_rows(tmp_path / "rate.csv")
    assert len(rows) == len(rate_bench.CURVES) * len(rate_bench.QUALITIES)
    assert {r["codec"] for r in rows} == {c[0] for c in rate_bench.CURVES}
    assert {r["transform"] for r in rows} == {"identity", "dtufc", "fcm"}
    for r in rows:
        assert int(r["n_images"]) == rate_bench.SMOKE_IMAGES
        assert float(r["bpfp"]) > 0 and float(r["bits_per_pixel"]) > 0
        assert math.isclose(float(r["bpfp"]) * 4 * 16 * 16, float(r["bits_per_pixel"]) * 64 * 64, rel_tol=1e-3)
        assert math.isfinite(float(r["feature_psnr"])) and math.isfinite(float(r["image_psnr"]))
    # Higher quality index means a better reconstruction for the scale hyperprior.
    hp = sorted((r for r in rows if r["codec"] == "hyperprior"), key=lambda r: int(r["quality"]))
    assert float(hp[-1]["feature_psnr"]) > float(hp[0]["feature_psnr"])
    md = (tmp_path / "rate.md").read_text()
    assert "## BD-rate" in md and "| hyperprior | dtufc | identity |" in md and "meg bench rate --smoke" in md


def test_bd_rate_is_zero_for_equal_curves_and_negative_when_test_saves_rate() -> None:
    rates, psnrs = [0.2, 0.4, 0.8, 1.6], [25.0, 29.0, 33.0, 36.0]
    assert abs(rate_bench.bd_rate(rates, psnrs, rates, psnrs)) < 1e-9
    assert math.isclose(rate_bench.bd_rate(rates, psnrs, [r * 0.8 for r in rates], psnrs), -20.0, rel_tol=1e-6)
    assert math.isnan(rate_bench.bd_rate(rates, psnrs, rates, [p + 50 for p in psnrs]))  # no overlap

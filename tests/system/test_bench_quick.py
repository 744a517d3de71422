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
    members = [r for r in rows if r["scheme"].startswith(snr_bench.ENVELOPE_CODER + " q")]
    envelope = [r for r in rows if r["scheme"].startswith("digital envelope")]
    rows = [r for r in rows if r not in members and r not in envelope]
    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    expected = ["raw-fp16 uncoded QPSK", "hyperprior+LDPC QPSK r1/2", "hyperprior+LDPC 16QAM r2/3", "MEG (analog)"]
    expected += [label for model, label in (("jscc_full", "JSCC (no merge)"), ("jscc_e2e", "E2E-MEG"),
                                            ("jscc_e2e_fixed", "E2E-MEG (fixed merge map)"),
                                            ("jscc_e2e_learned", "E2E-MEG (learned merge)"))
                 if (PACKAGE_WEIGHTS / f"{model}.safetensors").is_file()]
    assert schemes == expected
    n_cells = len(snr_bench.CHANNELS) * len(snr_bench.SMOKE_SNRS_DB)
    assert len(rows) == len(schemes) * n_cells
    # The digital envelope: per budget and cell, a configuration that was simulated and fits the budget.
    assert members and {r["scheme"] for r in envelope} == {"digital envelope ≤256 uses", "digital envelope ≤512 uses"}
    assert len(envelope) == 2 * n_cells
    by_config = {(r["scheme"], r["channel"], r["snr_db"]): r for r in members}
    for r in envelope:
        member = by_config[(r["config"], r["channel"], r["snr_db"])]
        assert float(member["channel_uses_per_image"]) <= float(r["scheme"].split("≤")[1].split()[0])
        assert member["psnr_db"] == r["psnr_db"]
    for r in rows:
        assert int(r["n_images"]) == snr_bench.SMOKE_IMAGES
        assert 0 < float(r["psnr_db"]) < 100 and 0 <= float(r["ms_ssim"]) <= 1
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["erased_fraction"]) <= 1
        assert float(r["symbols_per_image"]) > 0 and math.isfinite(float(r["fd"]))
        # Bands: the mean lies in its 95 % interval; side information costs channel uses.
        assert float(r["psnr_ci_low"]) <= float(r["psnr_db"]) <= float(r["psnr_ci_high"])
        assert float(r["accuracy_ci_low"]) <= float(r["accuracy"]) <= float(r["accuracy_ci_high"])
        side = float(r["bits_per_image"]) if r["kind"] == "analog" else 0.0
        assert float(r["channel_uses_per_image"]) == pytest.approx(float(r["symbols_per_image"]) + side, abs=0.01)

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
    assert {r["transform"] for r in rows} == {"identity", "fcm", "dtufc", "dtufc-clip", "dtufc-pwl"}
    for r in rows:
        assert int(r["n_images"]) == rate_bench.SMOKE_IMAGES
        assert float(r["bpfp"]) > 0 and float(r["bits_per_pixel"]) > 0
        assert math.isclose(float(r["bpfp"]) * 4 * 16 * 16, float(r["bits_per_pixel"]) * 64 * 64, rel_tol=1e-3)
        assert math.isfinite(float(r["feature_psnr"])) and math.isfinite(float(r["image_psnr"]))
    # Higher quality index means a better reconstruction for the scale hyperprior.
    hp = sorted((r for r in rows if r["codec"] == "hyperprior"), key=lambda r: int(r["quality"]))
    assert float(hp[-1]["feature_psnr"]) > float(hp[0]["feature_psnr"])
    md = (tmp_path / "rate.md").read_text()
    assert "## BD-rate" in md and "| gained | dtufc | identity |" in md and "meg bench rate --smoke" in md


def test_bd_rate_is_zero_for_equal_curves_and_negative_when_test_saves_rate() -> None:
    rates, psnrs = [0.2, 0.4, 0.8, 1.6], [25.0, 29.0, 33.0, 36.0]
    assert abs(rate_bench.bd_rate(rates, psnrs, rates, psnrs)) < 1e-9
    assert math.isclose(rate_bench.bd_rate(rates, psnrs, [r * 0.8 for r in rates], psnrs), -20.0, rel_tol=1e-6)
    assert math.isnan(rate_bench.bd_rate(rates, psnrs, rates, [p + 50 for p in psnrs]))  # no overlap


def test_bench_universal_smoke(tmp_path: Path) -> None:
    """Two coders of 4 steps (one per source, one on the mix) evaluated on all three sources; the report has
    every section and the numbers have their shapes. Minutes of CPU: the LLM hidden states are collected."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    run_cli("universal", "--quick", "--coders", "fcm@image", "dtufc@mixed", "--steps", "4", "--jobs", "1",
            "--out", str(out), "--cache-dir", str(cache), timeout=600)
    for name in ("universal.csv", "universal.json", "universal.md", "universal.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in cache.iterdir()) == ["dtufc@mixed-4.pt", "fcm@image-4.pt"]
    rows = read_rows(out / "universal.csv")
    full = [r for r in rows if r["budget"] == "full"]
    assert {(r["coder"], r["evaluated_on"]) for r in full} == {
        (c, s) for c in ("fcm@image", "dtufc@mixed") for s in ("image", "llm-k1", "llm-k2")}
    assert len(full) == 2 * 3 * 4  # every quality of every coder on every source
    half = {(r["coder"], r["evaluated_on"]) for r in rows if r["budget"] == "half"}
    assert half == {("fcm@image", "image"), ("dtufc@mixed", "image"), ("dtufc@mixed", "llm-k1"), ("dtufc@mixed", "llm-k2")}
    for r in rows:
        assert float(r["bpfp"]) > 0 and float(r["feature_psnr_db"]) > 0
        if r["evaluated_on"] == "image":
            assert 0 < float(r["image_psnr_db"]) < 100 and 0 <= float(r["accuracy"]) <= 1
        elif r["budget"] == "full" and r["trained_on"] in (r["evaluated_on"], "mixed"):
            assert 0 <= float(r["agreement"]) <= 1 and 0 <= float(r["accuracy"]) <= 1
        else:  # LLM task metrics only where the report uses them (the costly part)
            assert math.isnan(float(r["accuracy"])) and math.isnan(float(r["agreement"]))
    md = (out / "universal.md").read_text()
    for heading in ("The transform alone", "Per source", "Cross-source transfer", "Did training stop moving",
                    "within 1 point of uncoded"):
        assert heading in md, heading
    import json

    trip = json.loads((out / "universal.json").read_text())["round_trip"]
    for source, vals in trip.items():
        assert vals["dtufc-pwl"] > vals["dtufc"] + 20, (source, vals)  # invertible vs 256 levels
    # The report is rebuilt from the JSON alone (no training, no evaluation), to the same text.
    (out / "universal.md").unlink()
    run_cli("universal", "--report-only", "--out", str(out))
    assert (out / "universal.md").read_text() == md


def test_bench_adapt_smoke(tmp_path: Path) -> None:
    import json

    run_cli("adapt", "--smoke", "--jobs", "1", "--out", str(tmp_path), "--schemes", "JSCC (no merge)",
            "gained-native q1+LDPC QPSK r1/2", "gained-native q4+LDPC 16QAM r1/2")
    for name in ("adapt.csv", "adapt.json", "adapt.md", "adapt.png"):
        assert (tmp_path / name).is_file(), name
    out = json.loads((tmp_path / "adapt.json").read_text())
    sweep = out["sweep"]
    fixed = {r["scheme"] for r in sweep if r["scheme"] != "auto"}
    assert fixed == {"JSCC (no merge)", "gained-native q1+LDPC QPSK r1/2", "gained-native q4+LDPC 16QAM r1/2"}
    for ch in ("awgn", "rayleigh"):
        for snr in (-5.0, 25.0):
            cell = [r for r in sweep if r["channel"] == ch and r["snr_db"] == snr]
            auto = next(r for r in cell if r["scheme"] == "auto")
            best = max((r for r in cell if r["scheme"] != "auto"), key=lambda r: r["psnr_db"])
            # auto's image is one of the fixed schemes' images under the same noise: the paired difference to
            # the best is what the two means differ by, and auto never beats the best mean by more than luck.
            assert auto["minus_best_db"] == pytest.approx(auto["psnr_db"] - best["psnr_db"], abs=1e-6)
            assert auto["best_fixed_scheme"] == best["scheme"]
            assert set(json.loads(auto["chosen"])) <= fixed
    low = next(r for r in sweep if r["channel"] == "awgn" and r["snr_db"] == -5.0 and r["scheme"] == "auto")
    assert set(json.loads(low["chosen"])) == {"JSCC (no merge)"}  # below every digital cliff: analog
    traces = {(t["channel"], t["trace"]) for t in out["traces"]}
    assert traces == {(ch, tr) for ch in ("awgn", "rayleigh") for tr in ("walk-away", "tunnel")}
    assert "## Verdict" in (tmp_path / "adapt.md").read_text()

"""``meg bench serve --open-loop`` in a tiny configuration: Poisson arrivals, both scheduler policies, outputs
that parse, nothing lost. (The committed full run is bench/results/serve_open_loop.*.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import serve


def test_poisson_arrivals_are_seeded_increasing_and_at_the_rate() -> None:
    a = serve.poisson_arrivals(4000, 2.0, seed=3)
    assert a == serve.poisson_arrivals(4000, 2.0, seed=3) and a != serve.poisson_arrivals(4000, 2.0, seed=4)
    gaps = np.diff([0.0, *a])
    assert (gaps >= 0).all() and a[-1] <= 2000.0
    assert abs(len(a) / a[-1] - 2.0) < 0.01           # the offered rate is the stated one
    assert abs(np.std(gaps) / np.mean(gaps) - 1.0) < 0.1   # exponential-like gaps, not a fixed period


@pytest.mark.slow   # starts two testbeds of its own (not through the fixtures that mark this automatically)
@pytest.mark.timeout(600)
def test_open_loop_quick_compares_both_policies(testbed_model_dir: Path, tmp_path: Path) -> None:
    argv = ["--open-loop", "--requests", "6", "--rate", "2", "--steps", "2", "--segments", "2",
            "--model-dir", str(testbed_model_dir), "--out", str(tmp_path)]
    assert serve.main(argv) == 0
    summary = json.loads((tmp_path / "serve_open_loop.json").read_text())
    assert summary["arrival_rate_rps"] == 2.0 and summary["capacity"] is None
    assert [p["mode"] for p in summary["policies"]] == ["request", "step"]
    for policy in summary["policies"]:
        assert policy["ok"] == 6 and policy["lost"] == 0, (policy["errors_by_kind"], policy["lost_by_kind"])
        assert "--policy" in policy["edge_args"]
        assert 0 < policy["latency_p50_s"] <= policy["latency_p99_s"] <= policy["latency_max_s"]
    assert summary["mean_latency_ratio_step_request"] > 0
    # Two segments in ABBA order: request, step, then step, request; every arrival sent once per policy.
    assert [(r["segment"], r["policy"]) for r in summary["segments"]] == \
        [(0, "request"), (0, "step"), (1, "step"), (1, "request")]
    assert sum(r["arrivals"] for r in summary["segments"] if r["policy"] == "step") == 6
    with open(tmp_path / "serve_open_loop.csv", newline="") as f:
        assert [r["policy"] for r in csv.DictReader(f)] == ["request", "step"]
    with Image.open(tmp_path / "serve_open_loop.png") as png:
        assert png.size[0] > 100
    assert "| step |" in (tmp_path / "serve_open_loop.md").read_text()

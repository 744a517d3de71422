"""The serving and overhead benchmarks in --quick mode against the shared testbed: outputs parse, nothing is lost.

Driving the session's running testbed (``--url``) keeps this cheap; the benchmarks' own testbed launcher
(batching on vs off) is what ``meg bench serve`` runs by default.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from PIL import Image

from bench import overhead, serve
from conftest import Testbed


@pytest.fixture()
def torch_threads() -> Iterator[None]:
    """The overhead bench sets this process's torch threads (to the edge's count); put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(300)
def test_serve_bench_quick(testbed: Testbed, tmp_path: Path) -> None:
    assert serve.main(["--quick", "--url", testbed.url, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "serve.json").read_text())
    (mode,) = summary["modes"]
    assert mode["mode"] == "external" and mode["requests"] == 16 and mode["concurrency"] == 4
    assert mode["lost"] == 0, mode["lost_by_kind"]
    assert mode["ok"] == 16, mode["errors_by_kind"]
    assert mode["throughput_rps"] > 0
    assert 0 < mode["latency_p50_s"] <= mode["latency_p95_s"] <= mode["latency_p99_s"] <= mode["latency_max_s"]
    assert mode["mean_batch_size"] >= 1
    (row,) = read_csv(tmp_path / "serve.csv")
    assert int(row["ok"]) == 16 and int(row["lost"]) == 0 and float(row["throughput_rps"]) > 0
    with Image.open(tmp_path / "serve.png") as png:
        assert png.size[0] > 100
    assert "| external |" in (tmp_path / "serve.md").read_text()


@pytest.mark.timeout(300)
def test_overhead_bench_quick(testbed: Testbed, tmp_path: Path, torch_threads: None) -> None:
    assert overhead.main(["--quick", "--url", testbed.url, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "overhead.json").read_text())
    assert summary["monolithic_median_s"] > 0 and summary["testbed_median_s"] > 0
    assert summary["ratio_median"] == pytest.approx(summary["testbed_median_s"] / summary["monolithic_median_s"])
    # Same model, seed and steps on both paths: only the codec's fp16 rounding separates the images.
    psnr = summary["image_psnr_db_testbed_vs_monolithic"]
    assert psnr == "inf" or psnr > 35
    rows = read_csv(tmp_path / "overhead.csv")
    measured = [r for r in rows if r["warmup"] == "False"]
    assert sorted(r["path"] for r in measured) == ["monolithic"] * 3 + ["testbed"] * 3
    assert all(float(r["seconds"]) > 0 for r in measured)
    with Image.open(tmp_path / "overhead.png") as png:
        assert png.size[0] > 100
    assert "Ratio of medians" in (tmp_path / "overhead.md").read_text()

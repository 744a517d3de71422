"""Split-point generation: the edge runs steps 1..k, the device's finisher k+1..N through the same backend
class and the same loop, and the image is the one an unsplit run gives, for every backend family."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from device_client.finisher import SplitFinisher
from models.backends import BatchItem, load_backend
from tiny_models import build_sd3, build_sdxl

PROMPT = "a red circle"


def edge_run(path: Path, steps: int, split: int, seed: int = 5, guidance: float = 3.0) -> torch.Tensor:
    backend = load_backend(path)
    item = BatchItem(PROMPT, seed, guidance, threading.Event())
    out = backend.generate([item], steps, backend.latent_shape(0, 0), split).latents[0]
    assert out is not None
    return out.unsqueeze(0)


def assert_split_is_seamless(path: Path, steps: int, splits: list[int]) -> None:
    full = edge_run(path, steps, 0)
    finisher = SplitFinisher(path)
    for k in splits:
        noisy = edge_run(path, steps, k)
        assert not torch.allclose(noisy, full, atol=1e-2)   # the edge really stopped early
        finished = finisher.finish(noisy, PROMPT, k, steps, 3.0)
        torch.testing.assert_close(finished, full, atol=1e-4, rtol=1e-4, msg=f"split at {k} of {steps}")


def test_ldm_split_at_every_step_matches_the_unsplit_run(tiny_model_dir: Path) -> None:
    assert_split_is_seamless(tiny_model_dir, 4, [1, 2, 3])


def test_sdxl_split_matches_the_unsplit_run(tmp_path: Path) -> None:
    assert_split_is_seamless(build_sdxl(tmp_path), 4, [1, 3])   # Euler: the step index is set, not derived


def test_sd3_split_matches_the_unsplit_run(tmp_path: Path) -> None:
    assert_split_is_seamless(build_sd3(tmp_path), 4, [2])       # flow matching, 16-channel latents


def test_the_finisher_refuses_what_it_cannot_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    finisher = SplitFinisher(tiny_model_dir)
    with pytest.raises(ValueError, match="shape"):
        finisher.finish(torch.zeros(1, 3, 8, 8), PROMPT, 1, 4, 3.0)
    with pytest.raises(ValueError, match="split_step"):
        finisher.finish(torch.zeros(1, 4, 8, 8), PROMPT, 4, 4, 3.0)
    with pytest.raises(ValueError, match="does not exist"):
        SplitFinisher(tmp_path / "nowhere").finish(torch.zeros(1, 4, 8, 8), PROMPT, 1, 4, 3.0)

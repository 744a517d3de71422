"""The variable-rate coder (gain vectors per quality), its trainer, and the three DT-UFC transforms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codec.image_sets import image_set_dir, write_image_set_config
from codec.learned import (CoderConfig, build_model, decode_planes, encode_planes, load_coder, merge_weights_set,
                           save_weights_set, export_state)
from codec.train_gained import GainedJob, SourceTransforms, TrainSource, ladder_entries, train_gained
from codec.transforms import (DtufcClipStage, DtufcPwlStage, DtufcStage, dtufc_index_forward, dtufc_index_inverse,
                              pwl_forward, pwl_inverse)
from codec.base import StageContext
from models import DEFAULT_MODEL_DIR

SET = image_set_dir(DEFAULT_MODEL_DIR)


def _heavy_tailed(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((n,)) if seed < 0 else torch.randn(n, generator=g) ** 3


def test_piecewise_linear_dtufc_is_invertible_and_differentiable() -> None:
    x = _heavy_tailed(20_000)
    tr = SourceTransforms.fit(x.view(-1, 1, 1, 1))
    u = pwl_forward(x, tr.centres)
    assert torch.allclose(pwl_inverse(u, tr.centres), x, atol=1e-4 * float(x.abs().max()))
    inside = (x >= tr.centres[0]) & (x <= tr.centres[-1])
    assert float(u[inside].min()) >= 0.0 and float(u[inside].max()) <= 1.0
    # Monotonic: order is kept, so a coder sees the same ranking of values.
    order = torch.argsort(x)
    assert bool((u[order][1:] >= u[order][:-1] - 1e-7).all())
    # The feature-domain loss needs gradients through the inverse.
    t = u[:100].clone().requires_grad_(True)
    pwl_inverse(t, tr.centres).sum().backward()
    assert t.grad is not None and bool((t.grad > 0).all())


def test_upstream_dtufc_round_trip_is_bounded_by_its_cells_and_clip_fit_tightens_the_tails() -> None:
    x = _heavy_tailed(50_000, seed=1)
    tr = SourceTransforms.fit(x.view(-1, 1, 1, 1))
    back = dtufc_index_inverse(dtufc_index_forward(x, tr.centres), tr.centres)
    assert float((back - x).pow(2).mean()) > 0  # lossy: 256 levels
    pwl_back = pwl_inverse(pwl_forward(x, tr.centres), tr.centres)
    assert float((pwl_back - x).pow(2).mean()) < 1e-6 * float((back - x).pow(2).mean()) + 1e-10
    # Centres fitted on clipped values stay inside the FCM range; the unclipped ones chase the tails.
    assert tr.lo <= float(tr.clip_centres[0]) and float(tr.clip_centres[-1]) <= tr.hi
    assert float(tr.centres[-1] - tr.centres[0]) > float(tr.clip_centres[-1] - tr.clip_centres[0])


def test_the_three_dtufc_stages_of_the_shipped_set() -> None:
    ctx = StageContext(params={})
    x = {"x": torch.randn(1, 4, 16, 16) * 3}
    plain, clip, pwl = DtufcStage({}, SET), DtufcClipStage({}, SET), DtufcPwlStage({}, SET)
    assert not torch.equal(plain.centres, clip.centres)  # two fitted codebooks
    for stage in (plain, clip):
        u = stage.forward(x, ctx)["x"]
        assert float(u.min()) >= 0 and float(u.max()) < 1
    back = pwl.inverse(pwl.forward(x, ctx), ctx)["x"]
    assert torch.allclose(back, x["x"], atol=1e-3)


def _tiny_cfg() -> CoderConfig:
    return CoderConfig("gained", in_ch=1, N=8, M=8, levels=4)


@torch.no_grad()
def test_gained_bitstream_decodes_to_the_models_reconstruction_at_every_quality() -> None:
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    model.update(force=True)
    model.eval()
    x = torch.rand(2, 1, 32, 48) * 200  # large enough that an untrained analysis gives non-zero symbols
    bits = []
    for q in range(4):
        view = model.at_quality(q)
        strings = encode_planes(view, "gained", x)
        decoded = decode_planes(view, "gained", strings, tuple(x.shape))
        assert torch.allclose(decoded, view(x)["x_hat"], atol=1e-4)
        bits.append(sum(len(s) for group in strings for s in group))
    # The gains start as a ladder: a higher quality quantises finer, so it costs more bits.
    assert bits == sorted(bits) and bits[0] < bits[-1], bits
    with pytest.raises(ValueError):
        model.at_quality(4)


def test_trainer_uses_the_feature_domain_loss_and_keeps_a_half_budget_snapshot() -> None:
    x = _heavy_tailed(64 * 32 * 32, seed=2).view(64, 1, 32, 32)
    tr = SourceTransforms.fit(x)
    src = tr.train_source("s", x, "dtufc-pwl")
    assert src.inverse is not None and src.dist_scale == pytest.approx(1 / tr.span ** 2)
    assert tr.train_source("s", x, "dtufc").inverse is None  # upstream: loss in the index domain
    job = GainedJob(steps=6, batch=2, patch=16, N=8, M=8)
    res = train_gained(job, [src, TrainSource("t", tr.forward(x, "fcm"))])
    assert res.half is not res.model and not res.model.training
    assert len(res.log) >= 2 and res.log[-1]["step"] == 5
    with pytest.raises(ValueError, match="smaller than the patch"):
        train_gained(GainedJob(steps=1, patch=64), [src])


def test_a_set_holds_per_quality_and_variable_rate_coders_side_by_side(tmp_path: Path) -> None:
    torch.manual_seed(0)
    stem = tmp_path / "learned_t"
    compact_cfg = CoderConfig("factorized", N=8, M=8)
    compact = build_model(compact_cfg)
    compact.update(force=True)
    save_weights_set(stem, {"factorized.identity.q1": (compact, compact_cfg, {"lambda": 1.0})}, {"source": "test"})
    gained = build_model(_tiny_cfg())
    gained.update(force=True)
    merge_weights_set(stem, {"gained.fcm": export_state(gained)}, ladder_entries("gained.fcm", _tiny_cfg(), {}), {})
    # Re-saving the per-quality coders keeps the variable-rate one (and the reverse).
    save_weights_set(stem, {"factorized.identity.q1": (compact, compact_cfg, {"lambda": 2.0})}, {"source": "test"})
    write_image_set_config(tmp_path, tmp_path, {"method": "test"}, set_name="t", model_id="test")
    for q in (1, 4):
        model, entry = load_coder("t", "gained", "fcm", q, tmp_path)
        assert entry["quality_index"] == q - 1 and model.q == q - 1
    _, entry = load_coder("t", "factorized", "identity", 1, tmp_path)
    assert entry["lambda"] == 2.0

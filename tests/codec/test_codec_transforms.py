"""Round trips and error bounds of the distribution transforms and the packing stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import codec  # noqa: F401  (registers stages)
from codec.base import CodecError, StageContext
from codec.image_sets import image_set_dir, write_image_set_config
from codec.packing import TileStage, grid_for, tile_planes, untile_planes
from codec.registry import build_codec
from codec.transforms import (DtufcStage, FcmStage, IdentityStage, fit_dtufc_centres, kmeans_1d,
                              resolve_weights_file, save_dtufc_centres)
from models import DEFAULT_MODEL_DIR

#: The embedded model's image codec set (committed): the fitted stages read it and nothing else.
SET = image_set_dir(DEFAULT_MODEL_DIR)


def _as_set(folder: Path, name: str) -> Path:
    """Make ``folder`` (holding fitted files) a codec set: codecs only read files a config.json hashes."""
    write_image_set_config(folder, folder, {"method": "test"}, set_name=name, model_id="test")
    return folder


def _latents(seed: int = 0, shape: tuple[int, ...] = (2, 4, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Peaky, heavy-tailed like VAE latents: Laplacian times a per-channel scale.
    u = torch.rand(shape, generator=g) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs()) * 0.7


def test_identity_is_bit_exact() -> None:
    x = {"latents": _latents()}
    stage, ctx = IdentityStage({}, None), StageContext(params={})
    assert torch.equal(stage.inverse(stage.forward(x, ctx), ctx)["latents"], x["latents"])


@pytest.mark.parametrize("shape,grid", [((1, 4, 16, 16), (2, 2)), ((16, 8, 8), (4, 4)), ((2, 3, 5, 7), (1, 3))])
def test_tile_round_trip_bit_exact(shape: tuple[int, ...], grid: tuple[int, int]) -> None:
    x = _latents(1, shape)
    assert grid_for(shape[-3]) == grid
    for mode in ("grid", "native"):
        ctx = StageContext(params={})
        stage = TileStage({"tile_mode": mode}, None)
        packed = stage.forward({"latents": x}, ctx)["latents"]
        assert packed.dim() == 4 and (packed.shape[1] == 1 if mode == "grid" else packed.shape[1] == shape[-3])
        assert torch.equal(stage.inverse({"latents": packed}, ctx)["latents"], x)


def test_tile_layout_is_a_grid_of_channels() -> None:
    x = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(1, 4, 2, 2)
    plane = tile_planes(x)
    assert plane.shape == (1, 1, 4, 4)
    assert torch.equal(plane[0, 0, :2, 2:], x[0, 1]) and torch.equal(plane[0, 0, 2:, :2], x[0, 2])
    assert torch.equal(untile_planes(plane, 4), x)


def test_tile_rejects_bad_header() -> None:
    stage = TileStage({}, None)
    for bad in ("", "latents:0x4", "latents:1x4x16", "garbage", "latents:axb"):
        with pytest.raises(CodecError):
            stage.inverse({"latents": torch.zeros(1, 1, 32, 32)}, StageContext(params={"tile_shapes": bad}))
    with pytest.raises(CodecError):
        TileStage({"tile_mode": "diagonal"}, None)


def test_fcm_error_bounded_by_truncation() -> None:
    x = _latents(2)
    lo, hi = -1.5, 1.5
    stage, ctx = FcmStage({"fcm_lo": str(lo), "fcm_hi": str(hi)}, None), StageContext(params={})
    y = stage.forward({"x": x}, ctx)["x"]
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    back = stage.inverse({"x": y}, ctx)["x"]
    excess = (x - x.clamp(lo, hi)).abs()
    assert torch.all((back - x).abs() <= excess + 1e-5)


def test_fcm_shipped_stats_and_bad_params() -> None:
    stage = FcmStage({}, SET)  # the set's own name (shapes_v1) by default
    assert stage.hi > stage.lo
    for params in ({"fcm_lo": "1", "fcm_hi": "0"}, {"fcm_lo": "nan", "fcm_hi": "1"}, {"fcm_lo": "x", "fcm_hi": "1"}):
        with pytest.raises(CodecError):
            FcmStage(params, None)


def test_kmeans_1d_recovers_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(2000, generator=g) * 0.01 + c for c in (-3.0, 0.0, 5.0)])
    centres = kmeans_1d(values, 3)
    assert torch.allclose(centres, torch.tensor([-3.0, 0.0, 5.0]), atol=0.01)


def test_dtufc_error_bounded_by_centre_spacing(tmp_path: Path) -> None:
    x = _latents(3)
    centres = fit_dtufc_centres(_latents(4, (64, 4, 16, 16)), bits=6)
    save_dtufc_centres(tmp_path / "dtufc_unit.safetensors", centres)
    stage, ctx = DtufcStage({"dtufc_centres": "unit", "dtufc_bits": "6"}, _as_set(tmp_path, "unit")), \
        StageContext(params={})
    y = stage.forward({"x": x}, ctx)["x"]
    assert float(y.min()) >= 0.0 and float(y.max()) < 1.0
    # The output is the index / 2^b: exactly representable, so the inverse finds the same centre.
    idx = (y * 64).round().long()
    back = stage.inverse({"x": y}, ctx)["x"]
    c = centres[0]
    assert torch.equal(back, c[idx])
    inside = (x >= c[0]) & (x < c[-1])
    spacing = c[(idx + 1).clamp(max=63)] - c[idx]
    assert torch.all(back[inside] <= x[inside]) and torch.all((x - back)[inside] <= spacing[inside] + 1e-6)
    # Values below the first centre map to it; above the last, to the last.
    assert torch.all(back[x < c[0]] == c[0]) and torch.all(back[x >= c[-1]] == c[-1])


def test_dtufc_per_channel_groups(tmp_path: Path) -> None:
    train = _latents(5, (32, 4, 8, 8)) * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    centres = fit_dtufc_centres(train, bits=4, groups=2)
    assert centres.shape == (2, 16)
    save_dtufc_centres(tmp_path / "dtufc_grp.safetensors", centres)
    stage, ctx = DtufcStage({"dtufc_centres": "grp"}, _as_set(tmp_path, "grp")), StageContext(params={})
    x = train[:2]
    back = stage.inverse(stage.forward({"x": x}, ctx), ctx)["x"]
    assert torch.all(back[:, :2].unsqueeze(-1).sub(centres[0]).abs().min(-1).values < 1e-6)
    assert torch.all(back[:, 2:].unsqueeze(-1).sub(centres[1]).abs().min(-1).values < 1e-6)


def test_dtufc_shipped_centres_round_trip() -> None:
    stage, ctx = DtufcStage({}, SET), StageContext(params={})
    assert stage.levels == 256
    x = _latents(6)
    back = stage.inverse(stage.forward({"x": x}, ctx), ctx)["x"]
    c = stage.centres[0]
    inside = (x >= c[0]) & (x < c[-1])
    assert float((back - x)[inside].abs().max()) <= float((c[1:] - c[:-1]).max()) + 1e-6


@pytest.mark.parametrize("name", ["../learned_shapes_v1", "/etc/passwd", "shapes_v1/../../x", "", "no_such_set",
                                  "a" * 100, "shapes v1"])
def test_unknown_or_path_like_centre_names_rejected(name: str) -> None:
    with pytest.raises(CodecError):
        DtufcStage({"dtufc_centres": name}, SET)
    with pytest.raises(CodecError):
        build_codec("dtufc+gained", {"dtufc_centres": name}, SET)
    with pytest.raises(CodecError):
        resolve_weights_file(name, "fcm_", ".json", SET)


def test_dtufc_bits_mismatch_rejected() -> None:
    for bits in ("4", "0", "99", "eight"):
        with pytest.raises(CodecError):
            DtufcStage({"dtufc_bits": bits}, SET)

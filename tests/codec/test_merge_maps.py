"""Token-merge maps of E2E-MEG: what each map mode costs and that the device rebuilds exactly what was merged."""

from __future__ import annotations

import pytest
import torch

import codec
from codec.base import CodecError
from codec.merging import (LOCAL_CANDIDATES, local_candidates, merge_tokens, pack_merge_map, plan_merge,
                           unmerge_tokens, unpack_merge_map)


def test_local_candidates_are_neighbouring_b_tokens() -> None:
    h, w = 16, 16
    cand = local_candidates(h, w)
    assert cand.shape == (h * w // 2, LOCAL_CANDIDATES)
    for a, row in enumerate(cand.tolist()):
        i, j = divmod(2 * a, w)
        for b in row:
            q = 2 * b + 1  # raster index of B token b
            qi, qj = divmod(q, w)
            assert max(abs(qi - i), abs(qj - j)) == 1, (a, b)
    assert cand[0, 0] == 0  # the fixed partner of the first token is its right neighbour


@pytest.mark.parametrize("mode,bits", [("global", 128 * 7), ("local", 128 * 2), ("fixed", 0)])
def test_side_information_per_map_mode(mode: str, bits: int) -> None:
    """16x16 latent, ratio 0.5: every A token merges, so no bitmask is sent; only destinations cost."""
    assert plan_merge(256, 0.5, mode).side_bits == bits
    # Merging only some tokens needs the bitmask again.
    assert plan_merge(256, 0.25, mode).side_bits == 128 + 64 * plan_merge(256, 0.25, mode).dst_bits


@pytest.mark.parametrize("mode", ["global", "local", "fixed"])
@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_maps_pack_and_unpack_to_the_same_unmerge(mode: str, ratio: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 4, 16 * 16)
    merged, mask, dst = merge_tokens(x, ratio, mode, (16, 16))
    plan = plan_merge(256, ratio, mode)
    bits = pack_merge_map(mask, dst, plan, (16, 16))
    assert bits.size == 3 * plan.side_bits
    mask2, dst2 = unpack_merge_map(bits, 3, plan, (16, 16))
    assert torch.equal(mask2, mask) and torch.equal(dst2[mask2], dst[mask])
    assert torch.equal(unmerge_tokens(merged, mask2, dst2), unmerge_tokens(merged, mask, dst))
    if mode != "global":
        cand = local_candidates(16, 16)
        allowed = cand if mode == "local" else cand[:, :1]
        for m, d in zip(mask, dst):
            assert all(int(d[a]) in allowed[a].tolist() for a in torch.nonzero(m).flatten().tolist())


def test_global_matching_is_at_least_as_close_as_local_which_beats_fixed() -> None:
    """The price of a cheaper map: merged tokens are less similar, so unmerging errs more (on smooth data)."""
    torch.manual_seed(1)
    base = torch.nn.functional.interpolate(torch.randn(8, 4, 4, 4), size=(16, 16), mode="bilinear")
    x = (base + 0.1 * torch.randn(8, 4, 16, 16)).reshape(8, 4, 256)
    err = {}
    for mode in ("global", "local", "fixed"):
        merged, mask, dst = merge_tokens(x, 0.5, mode, (16, 16))
        err[mode] = float((unmerge_tokens(merged, mask, dst) - x).pow(2).mean())
    assert err["local"] <= err["fixed"] * 1.001 and err["global"] < err["fixed"], err


def test_map_mode_through_the_codec_and_bad_values_are_refused() -> None:
    x = {"latents": torch.randn(2, 4, 16, 16)}
    sizes = {}
    for mode in ("global", "local", "fixed"):
        c = codec.build_codec("merge+fp16", {"merge_map": mode}, None)
        payload = c.encode(x)
        sizes[mode] = len(payload.side_info)
        assert c.decode(payload)["latents"].shape == x["latents"].shape
    # Framing of the side block aside, the maps cost 112 and 32 bytes an image; the fixed map sends nothing.
    assert sizes["global"] - sizes["local"] == 2 * (112 - 32) and sizes["fixed"] == 0
    with pytest.raises(CodecError, match="merge_map"):
        codec.build_codec("merge+fp16", {"merge_map": "random"}, None)

"""PackedImages / PackedFeatures round trips and the bin packer's properties."""

import random

import pytest
import torch

from mixres.packing import PackedFeatures, PackedImages, pack_into_bins, patchify, seqlens_to_cu


def images(sizes, p=4):
    return [torch.randn(3, h * p, w * p) for h, w in sizes]


def test_pack_unpack_round_trip():
    imgs = images([(2, 3), (1, 1), (5, 2)])
    packed = PackedImages.from_images(imgs, 4)
    assert packed.patches.shape == (6 + 1 + 10, 3 * 16)
    assert packed.grid_hw.tolist() == [[2, 3], [1, 1], [5, 2]]
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 6, 7, 17]
    assert packed.num_images == 3
    for a, b in zip(packed.unpack(), imgs):
        assert torch.equal(a, b)


def test_patch_layout_is_conv_weight_layout():
    # one GEMM with conv.weight.flatten(1) must equal the Conv2d patch embedding
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    img = torch.randn(3, 8, 12)
    ref = conv(img[None])[0].flatten(1).T  # (h*w, 8), row-major
    out = patchify(img, 4) @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("bad,match", [
    ([torch.randn(3, 5, 8)], "not a positive multiple"),
    ([torch.randn(3, 8, 8), torch.randn(1, 8, 8)], "channels"),
    ([torch.full((3, 8, 8), float("nan"))], "NaN or inf"),
    ([torch.randn(8, 8)], r"expected \(C, H, W\)"),
    ([], "empty list"),
    ([torch.zeros(3, 8, 8, dtype=torch.uint8)], "float"),
])
def test_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PackedImages.from_images(bad, 4)


def test_packed_to_and_select():
    packed = PackedImages.from_images(images([(1, 2), (3, 1), (2, 2)]), 4)
    half = packed.to(dtype=torch.float64)
    assert half.patches.dtype == torch.float64 and half.cu_seqlens.dtype == torch.int32
    sub = packed.select([2, 0])
    assert sub.grid_hw.tolist() == [[2, 2], [1, 2]]
    assert torch.equal(sub.unpack()[1], packed.unpack()[0])


def feats(lens, d=5, prefix=1, pooled=True):
    tokens = torch.randn(sum(lens), d)
    grids = torch.tensor([[1, n - prefix] for n in lens])
    return PackedFeatures(tokens, seqlens_to_cu(lens), grids, prefix,
                          torch.randn(len(lens), d) if pooled else None)


def test_features_unpack_padded_select_cat():
    f = feats([3, 1, 4])
    parts = f.unpack()
    assert [p.shape[0] for p in parts] == [3, 1, 4]
    padded, mask = f.to_padded()
    assert padded.shape == (3, 4, 5) and mask.sum() == 8
    for i, p in enumerate(parts):
        assert torch.equal(padded[i][mask[i]], p)
        assert (padded[i][~mask[i]] == 0).all()
    sel = f.select([2, 0])
    assert torch.equal(sel.unpack()[0], parts[2]) and torch.equal(sel.pooled[1], f.pooled[0])
    both = PackedFeatures.cat([f, sel])
    assert both.num_images == 5 and torch.equal(both.unpack()[3], parts[2])
    assert torch.equal(both.cu_seqlens, seqlens_to_cu([3, 1, 4, 4, 3]))


def test_features_validation():
    with pytest.raises(ValueError, match="grid_hw"):
        PackedFeatures(torch.randn(4, 2), seqlens_to_cu([4]), torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="end at 4"):
        PackedFeatures(torch.randn(4, 2), seqlens_to_cu([3]), torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_prefix"):
        PackedFeatures.cat([feats([2], prefix=1), feats([2], prefix=0)])


def test_bins_properties():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(0, 120) for _ in range(rng.randint(1, 60))]
        budget = rng.randint(1, 300)
        bins = pack_into_bins(lengths, budget)
        flat = sorted(i for b in bins for i in b)
        assert flat == list(range(len(lengths)))          # every index exactly once
        for b in bins:
            total = sum(lengths[i] for i in b)
            assert total <= budget or len(b) == 1           # oversized items sit alone
        assert bins == pack_into_bins(lengths, budget)     # deterministic
        # first-fit-decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / budget
        lower = sum(lengths) / budget
        assert len(bins) <= 11 / 9 * max(lower, sum(n > budget for n in lengths)) + 2


def test_bins_edge_cases():
    assert pack_into_bins([], 10) == []
    assert pack_into_bins([5, 3], None) == [[0, 1]]
    assert pack_into_bins([50, 3, 4], 10) == [[0], [2, 1]]
    with pytest.raises(ValueError):
        pack_into_bins([1], 0)


# pooling: the one pooling of mixres (embed, the seed API, tests)

def _ragged(num_prefix, lens, dim=3, pooled=None):
    tokens = torch.randn(sum(lens), dim)
    return PackedFeatures(tokens, seqlens_to_cu(lens), torch.tensor([[1, n - num_prefix] for n in lens]),
                          num_prefix, pooled)


def test_pool_cls_mean_model_none_on_ragged_images():
    from mixres.packing import pool_features
    f = _ragged(1, [3, 6], pooled=torch.randn(2, 3))
    a, b = f.unpack()
    assert torch.equal(pool_features(f, "cls").pooled, torch.stack([a[0], b[0]]))
    # mean over each image's own patch tokens: prefix tokens and other images' tokens skipped
    assert torch.allclose(pool_features(f, "mean").pooled, torch.stack([a[1:].mean(0), b[1:].mean(0)]))
    assert pool_features(f, "model").pooled is f.pooled
    assert pool_features(f, "none").pooled is None


def test_pool_errors():
    from mixres.packing import check_pool, pool_features
    with pytest.raises(ValueError, match="no CLS token"):
        pool_features(_ragged(0, [2, 4]), "cls")
    with pytest.raises(ValueError, match="gives no pooled output"):
        pool_features(_ragged(0, [2, 4]), "model")
    with pytest.raises(ValueError, match=r"pool='max': choose one of"):
        pool_features(_ragged(0, [2]), "max")
    with pytest.raises(ValueError, match="needs select_layer=-1"):
        check_pool("model", -2)


def test_ragged_helpers():
    from mixres.packing import interleave_prefix, local_positions, segment_ids
    cu = seqlens_to_cu([2, 3])
    assert segment_ids(cu).tolist() == [0, 0, 1, 1, 1]
    assert local_positions(cu).tolist() == [0, 1, 0, 1, 2]
    tokens = torch.arange(5.0)[:, None]
    out, cu2 = interleave_prefix(torch.tensor([[-1.0]]), tokens, cu)
    assert out[:, 0].tolist() == [-1, 0, 1, -1, 2, 3, 4] and cu2.tolist() == [0, 3, 7]


def test_position_cache_hits_through_a_fresh_view_of_the_table():
    """Recipes read their table through a new view each forward (`pos[0]`): the cache must
    hit on the second forward even when the first view is still alive (a miss recomputes
    every grid; on CUDA that made the packed ViT 8x slower than its dense oracle)."""
    from mixres.families import PosCache

    param = torch.nn.Parameter(torch.randn(1, 16, 8))
    cache, calls = PosCache(), []

    def codes(view, grid):
        with torch.no_grad():  # nothing is cached while the table needs a gradient
            return cache.get(view, "t", grid, lambda: calls.append(grid) or view[: grid[0] * grid[1]])

    first = param[0]
    a = codes(first, (2, 3))
    second = param[0]  # a different Python object while `first` lives
    assert second is not first
    b = codes(second, (2, 3))
    assert calls == [(2, 3)] and torch.equal(a, b)
    with torch.no_grad():
        param.mul_(2)  # the table changed in place: recomputed
    codes(param[0], (2, 3))
    assert calls == [(2, 3), (2, 3)]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_table_is_the_library_resize(mode):
    """The separable (two-GEMM) resize equals F.interpolate of the table on every grid:
    up, down, non-square, 1 x 1 (fp32 <= 1e-6 relative)."""
    import torch.nn.functional as F

    from mixres.packing import resample_table

    table = torch.randn(196, 32)
    x = table.reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    for grid in [(7, 30), (14, 15), (32, 5), (1, 1), (3, 40), (28, 28)]:
        ref = F.interpolate(x, size=grid, mode=mode, align_corners=False).permute(0, 2, 3, 1).reshape(-1, 32)
        got = resample_table(table, grid, mode=mode)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-6 * ref.abs().max(), grid

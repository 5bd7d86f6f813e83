"""mixres.images: every size becomes a patch grid within the token budget with its aspect
ratio kept, then a normalized tensor (target_size, to_tensor, normalize, preprocess)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixres.images import normalize, preprocess, target_size, to_tensor
from tests.test_images import _rgba, saved

# target_size

P_SIZES = [14, 16]
BOUNDS = [(1, None), (1, 16), (1, 64), (4, 64), (64, 1024), (256, 256), (16, 4096), (7, 7),
          (100, 120)]


def grid(hw: tuple[int, int], p: int) -> tuple[int, int]:
    assert hw[0] % p == 0 and hw[1] % p == 0 and hw[0] > 0 and hw[1] > 0, (hw, p)
    return hw[0] // p, hw[1] // p


@pytest.mark.parametrize("args, kw, expected", [
    ((1, 1, 14), {}, (14, 14)),
    ((1, 1, 16), {"min_image_tokens": 4}, (32, 32)),
    ((224, 224, 16), {"max_image_tokens": 196}, (224, 224)),  # native size kept
    ((230, 220, 16), {}, (224, 224)),  # rounded to the nearest grid
    ((4000, 4000, 14), {}, (4004, 4004)),
    ((4000, 4000, 16), {"max_image_tokens": 256}, (256, 256)),
    ((4000, 4000, 16), {"max_image_tokens": 16}, (64, 64)),
    ((10000, 20, 16), {}, (10000, 16)),
    ((10000, 20, 14), {"max_image_tokens": 64}, (64 * 14, 14)),  # clamped: 64 x 1
    ((20, 10000, 16), {"max_image_tokens": 64}, (16, 64 * 16)),  # clamped: 1 x 64
    ((1, 10000, 16), {"min_image_tokens": 1000}, (16, 1000 * 16)),  # clamped while growing
    ((2000, 1000, 16), {"max_image_tokens": 512}, (32 * 16, 16 * 16)),
])
def test_target_size_cases(args, kw, expected):
    assert target_size(*args, **kw) == expected


@pytest.mark.parametrize("kw, match", [
    ({"patch_size": 0}, "patch_size"),
    ({"patch_size": -16}, "patch_size"),
    ({"patch_size": 16.0}, "patch_size"),
    ({"height": 0}, "height"),
    ({"width": -1}, "width"),
    ({"min_image_tokens": 0}, "min_image_tokens"),
    ({"max_image_tokens": 0}, "max_image_tokens"),
    ({"min_image_tokens": 65, "max_image_tokens": 64}, "must not exceed"),
    ({"height": True}, "height"),
])
def test_target_size_invalid(kw, match):
    args = {"height": 100, "width": 100, "patch_size": 16, **kw}
    with pytest.raises(ValueError, match=match):
        target_size(args.pop("height"), args.pop("width"), args.pop("patch_size"), **args)


def test_target_size_properties_on_random_shapes():
    rng = random.Random(0)
    extremes = [(1, 1), (10000, 20), (20, 10000), (4000, 4000), (1, 10000), (10000, 1)]
    shapes = extremes + [
        (max(1, int(math.exp(rng.uniform(0, 9.5)))), max(1, int(math.exp(rng.uniform(0, 9.5)))))
        for _ in range(1500)
    ]
    for h, w in shapes:
        for p in P_SIZES:
            # rounded half up, not to even
            native = (max(1, math.floor(h / p + 0.5)), max(1, math.floor(w / p + 0.5)))
            for lo, hi in BOUNDS:
                gh, gw = grid(target_size(h, w, p, min_image_tokens=lo, max_image_tokens=hi), p)
                n = gh * gw
                assert lo <= n and (hi is None or n <= hi), (h, w, p, lo, hi, gh, gw)
                if lo <= native[0] * native[1] and (hi is None or native[0] * native[1] <= hi):
                    assert (gh, gw) == native
                    continue
                budget = lo if native[0] * native[1] < lo else hi
                if math.sqrt(budget * min(h, w) / max(h, w)) < 1:
                    # aspect beyond the budget: one patch across, the budget along
                    assert min(gh, gw) == 1 and max(gh, gw) == budget, (h, w, p, lo, hi, gh, gw)
                    assert (gh >= gw) == (h >= w) or gh == gw
                    continue
                if lo == hi:
                    continue  # a single allowed count (e.g. a prime) may force any shape
                # each side within one patch of its ideal length -> aspect within two steps
                err = abs(math.log((gw / gh) / (w / h)))
                assert err <= 2 * math.log1p(1 / min(gh, gw)) + 1e-9, (h, w, p, lo, hi, gh, gw)
                assert n >= budget / 3, (h, w, p, lo, hi, gh, gw)


def test_target_size_is_deterministic():
    calls = [(h, w, 14, 4, 256) for h, w in [(333, 777), (1, 5000), (4096, 3)]]
    first = [target_size(h, w, p, min_image_tokens=lo, max_image_tokens=hi) for h, w, p, lo, hi in calls]
    assert first == [target_size(h, w, p, min_image_tokens=lo, max_image_tokens=hi)
                     for h, w, p, lo, hi in calls]


# to_tensor / normalize

def test_to_tensor_layout_and_range():
    arr = np.random.RandomState(2).randint(0, 256, (3, 5, 3), dtype=np.uint8)
    t = to_tensor(Image.fromarray(arr))
    assert t.shape == (3, 3, 5) and t.dtype == torch.float32 and t.is_contiguous()
    torch.testing.assert_close(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_to_tensor_rejects_other_modes():
    with pytest.raises(ValueError, match="RGBA"):
        to_tensor(Image.new("RGBA", (2, 2)))


def test_normalize():
    t = torch.ones(3, 2, 2)
    out = normalize(t, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out is not t
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
        normalize(t, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="non-zero"):
        normalize(t, (0, 0, 0), (1, 0, 1))


# preprocess

def test_preprocess_extreme_strip_real():
    strip = Image.new("RGB", (20, 10000), (255, 0, 0))  # 10000 tall x 20 wide
    t = preprocess(strip, 16, max_image_tokens=64)
    assert t.shape == (3, 64 * 16, 16) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_preprocess_keeps_grid_sized_images_untouched():
    arr = np.random.RandomState(3).randint(0, 256, (32, 48, 3), dtype=np.uint8)
    t = preprocess(Image.fromarray(arr), 16)
    torch.testing.assert_close(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)


def test_preprocess_resizes_with_bounds_and_options(tmp_path):
    path = saved(tmp_path, "a.png", _rgba())  # 3 x 1, alpha
    t = preprocess(path, 14, min_image_tokens=4, mean=(0, 0, 0), std=(1, 1, 1), background=(0, 0, 0))
    gh, gw = t.shape[1] // 14, t.shape[2] // 14
    assert t.shape[0] == 3 and gh * gw >= 4 and t.shape[1] % 14 == 0 and t.shape[2] % 14 == 0
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_preprocess_is_deterministic_and_source_independent(tmp_path):
    arr = np.random.RandomState(4).randint(0, 256, (123, 301, 3), dtype=np.uint8)
    path = saved(tmp_path, "d.png", Image.fromarray(arr))
    outs = [preprocess(src, 14, min_image_tokens=16, max_image_tokens=100)
            for src in (path, Path(path).read_bytes(), Image.fromarray(arr), path)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def test_preprocess_sample_photos():
    skdata = pytest.importorskip("skimage.data")
    for arr in (skdata.astronaut(), skdata.camera()):
        t = preprocess(Image.fromarray(arr), 16, max_image_tokens=256)
        assert t.shape == (3, 256, 256)
        assert -1.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_preprocess_passes_ready_tensors_through():
    t = torch.zeros(3, 32, 48)
    assert preprocess(t, 16, min_image_tokens=6, max_image_tokens=6) is t
    four = torch.zeros(4, 16, 16)
    assert preprocess(four, 16, mean=(0.5,) * 4, std=(0.5,) * 4) is four


@pytest.mark.parametrize("tensor, kw, match", [
    (torch.zeros(32, 32), {}, "must be \\(C, H, W\\)"),
    (torch.zeros(1, 3, 32, 32), {}, "must be \\(C, H, W\\)"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), {}, "must be float"),
    (torch.zeros(4, 32, 32), {}, "3 channels"),
    (torch.zeros(3, 30, 32), {}, "multiples of patch_size=16"),
    (torch.zeros(3, 0, 32), {}, "multiples"),
    (torch.zeros(3, 64, 64), {"max_image_tokens": 15}, "16 tokens"),
    (torch.zeros(3, 16, 16), {"min_image_tokens": 2}, "1 tokens"),
    (torch.full((3, 16, 16), float("nan")), {}, "NaN"),
])
def test_preprocess_rejects_bad_tensors(tensor, kw, match):
    with pytest.raises(ValueError, match=match) as info:
        preprocess(tensor, 16, **kw)
    assert str(tuple(tensor.shape)) in str(info.value)

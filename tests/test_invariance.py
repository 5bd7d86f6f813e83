"""check_invariance: passes for the exact backends, catches a backend that pads naively."""

import math

import pytest
import torch

import mixres
from mixres.encoders import register_encoder_backend
from mixres.encoders.loop import LoopEncoder
from mixres.packing import PackedFeatures, seqlens_to_cu


@register_encoder_backend("test-naive-padding")
class NaivePadding(LoopEncoder):
    """Pads every image to the largest one and reads back its content tokens: what most
    pipelines do, and exactly what check_invariance must catch."""

    def forward(self, packed):
        images = packed.unpack()
        H = max(i.shape[1] for i in images)
        W = max(i.shape[2] for i in images)
        canvases = []
        for img in images:
            c = img.new_zeros(img.shape[0], H, W)
            c[:, :img.shape[1], :img.shape[2]] = img
            canvases.append(c)
        from mixres.packing import PackedImages
        out = super().forward(PackedImages.from_images(canvases, packed.patch_size))
        p = packed.patch_size
        tokens, lens = [], []
        for img, t in zip(images, out.unpack()):
            h, w = img.shape[1] // p, img.shape[2] // p
            grid = t[out.num_prefix:].reshape(H // p, W // p, -1)[:h, :w].reshape(h * w, -1)
            tokens.append(torch.cat([t[:out.num_prefix], grid]))
            lens.append(tokens[-1].shape[0])
        return PackedFeatures(torch.cat(tokens), seqlens_to_cu(lens), packed.grid_hw,
                              out.num_prefix, out.pooled)


@pytest.fixture(scope="module")
def images():
    # the first image spans the largest height and width: naive padding leaves it alone
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, h, w, generator=g) for h, w in [(64, 80), (32, 48), (16, 80), (64, 16), (48, 32)]]


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-siglip"])
def test_packed_passes(preset, images):
    report = mixres.check_invariance(preset, images, backend="packed")
    assert report.passed, str(report)
    assert len(report.per_image) == len(images) and report.compositions == 3
    assert 0 <= report.max_error <= 1e-5 and all(math.isfinite(e) for e in report.per_image)
    assert "PASSED" in str(report)


def test_naive_padding_fails(images):
    report = mixres.check_invariance("tiny-vit", images, backend="test-naive-padding")
    assert not report.passed
    assert report.max_error > 1e-3
    # the largest image is its own padded size: only the others deviate
    assert report.per_image[0] < 1e-5 < min(report.per_image[1:])


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        mixres.check_invariance("tiny-vit", [], backend="packed")

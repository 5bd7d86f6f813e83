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

    def run_images(self, images):
        H = max(i.shape[1] for i in images)
        W = max(i.shape[2] for i in images)
        canvases = []
        for img in images:
            c = img.new_zeros(img.shape[0], H, W)
            c[:, :img.shape[1], :img.shape[2]] = img
            canvases.append(c)
        out = super().run_images(canvases)
        p = self.patch_size
        tokens, lens = [], []
        for img, t in zip(images, out.unpack()):
            h, w = img.shape[1] // p, img.shape[2] // p
            grid = t[out.num_prefix:].reshape(H // p, W // p, -1)[:h, :w].reshape(h * w, -1)
            tokens.append(torch.cat([t[:out.num_prefix], grid]))
            lens.append(tokens[-1].shape[0])
        grids = torch.tensor([[img.shape[1] // p, img.shape[2] // p] for img in images])
        return PackedFeatures(torch.cat(tokens), seqlens_to_cu(lens), grids, out.num_prefix, out.pooled)


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


# the reference runs every model the backends run (issue 19: the loop reference read
# num_hidden_layers, which CNN configs lack, and packed CNN images by a patch size they lack)

def _tiny(name):
    import transformers as tf
    from vit_pytorch import na_vit

    torch.manual_seed(0)
    stages = dict(hidden_sizes=[8, 16], depths=[1, 1])
    return {
        "resnet": lambda: tf.ResNetModel(tf.ResNetConfig(embedding_size=8, layer_type="basic", **stages)),
        "convnext": lambda: tf.ConvNextModel(tf.ConvNextConfig(num_stages=2, **stages)),
        "swinv2": lambda: tf.Swinv2Model(tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16,
                                                         depths=[1, 1], num_heads=[2, 2], window_size=4)),
        "navit": lambda: na_vit.NaViT(image_size=64, patch_size=16, num_classes=5, dim=32, depth=2, heads=4,
                                      mlp_dim=64, dim_head=8),
    }[name]().eval()


# repeated shapes, so "grouped" runs real batches of several images
MIXED = [(64, 48), (32, 48), (48, 32), (32, 48), (64, 48)]


@pytest.mark.parametrize("name,backend", [("resnet", "grouped"), ("convnext", "grouped"),
                                          ("swinv2", "grouped"), ("navit", "grouped"), ("navit", "navit")])
def test_reference_runs_every_family(name, backend):
    model = _tiny(name)
    imgs = [torch.randn(3, h, w) for h, w in MIXED]
    report = mixres.check_invariance(model, imgs, backend=backend)
    assert report.passed and len(report.per_image) == len(imgs), str(report)
    ref = mixres.load_encoder(model, backend="loop").encode(imgs)
    # the reference is the model's own forward on each image alone, read back as tokens
    with torch.no_grad():
        for img, tokens, pooled in zip(imgs, ref.unpack(), ref.pooled):
            if name == "navit":  # vit-pytorch's forward: logits from the pooled latent
                assert torch.allclose(model.mlp_head(pooled[None]), model([img]), atol=1e-6)
                continue
            out = model(pixel_values=img[None])
            hidden = out.last_hidden_state
            hidden = hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden
            assert torch.equal(tokens, hidden[0]) and torch.equal(pooled, out.pooler_output.flatten())


@pytest.mark.parametrize("name", ["resnet", "swinv2", "navit"])
def test_reference_at_an_inner_layer(name):
    model = _tiny(name)
    imgs = [torch.randn(3, h, w) for h, w in MIXED[:3]]
    backend = "navit" if name == "navit" else "grouped"
    report = mixres.check_invariance(model, imgs, backend=backend, select_layer=-2)
    assert report.passed, str(report)
    ref = mixres.load_encoder(model, backend="loop", select_layer=-2).encode(imgs)
    last = mixres.load_encoder(model, backend="loop").encode(imgs)
    assert ref.pooled is None and ref.tokens.shape[0] > 0
    assert not torch.equal(ref.unpack()[0][:4], last.unpack()[0][:4])  # a different layer


def test_packed_error_names_backends_that_run_it():
    model = _tiny("resnet")
    with pytest.raises(ValueError, match="backend='loop' or 'grouped'") as e:
        mixres.load_encoder(model, backend="packed")
    for backend in ("loop", "grouped"):  # what the message promises
        mixres.load_encoder(model, backend=backend).encode([torch.randn(3, 32, 48)])
    assert "\n" not in str(e.value)

"""Shape-grouped batching and the original toolkit API: a batch equals one image at a time.

Every family (ViT-family, windowed, convolutional, NaFlex) as a tiny random model: each
image's embedding / tokens in a mixed batch equal the unmodified model run on that
image alone.
"""

import inspect

import pytest
import torch
import transformers as tf
from conftest import rel_err

from mixres import batch_image_encoder as bie
from mixres.batch_image_encoder import (
    GroupedEncoder,
    encode_images,
    encode_images_batch,
    encode_images_group,
    encode_images_sequentially,
    encode_nested,
)
from mixres.encoders import load_encoder
from mixres.models.navit import NaViTConfig, NaViTModel
from mixres.packing import PackedImages
from mixres.vision_utils import image_encoder_size

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           patch_size=8, image_size=32)

# family -> (model class, config); patch 8 keeps the images small
FAMILIES = {
    "vit": (tf.ViTModel, lambda: tf.ViTConfig(**VIT)),
    "swinv2": (tf.Swinv2Model, lambda: tf.Swinv2Config(image_size=32, patch_size=4, embed_dim=16,
                                                       depths=[1, 1], num_heads=[2, 2], window_size=4)),
    "resnet": (tf.ResNetModel, lambda: tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                       depths=[1, 1], layer_type="basic")),
    "mobilevit": (tf.MobileViTModel, lambda: tf.MobileViTConfig(
        image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 32, 32],
        num_attention_heads=2, mlp_ratio=2.0)),
    "dinov3_vit": (tf.DINOv3ViTModel, lambda: tf.DINOv3ViTConfig(**VIT, num_register_tokens=2)),
    "dinov3_convnext": (tf.DINOv3ConvNextModel, lambda: tf.DINOv3ConvNextConfig(hidden_sizes=[8, 16],
                                                                                depths=[1, 1])),
    "clip": (tf.CLIPVisionModel, lambda: tf.CLIPVisionConfig(**VIT)),
    "siglip": (tf.SiglipVisionModel, lambda: tf.SiglipVisionConfig(**VIT)),
    "siglip2": (tf.Siglip2VisionModel, lambda: tf.Siglip2VisionConfig(
        **{k: v for k, v in VIT.items() if k != "image_size"}, num_patches=16)),
    "dinov2": (tf.Dinov2Model, lambda: tf.Dinov2Config(**VIT)),
    "navit": (NaViTModel, lambda: NaViTConfig(image_size=64, patch_size=8, dim=32, depth=2, heads=4,
                                              mlp_dim=64, dim_head=8, num_classes=10)),
}

# the route `encode_images` takes by itself (packed / navit backends where they apply)
ROUTE = {"vit": "packed", "clip": "packed", "siglip": "packed", "siglip2": "packed",
         "dinov2": "packed", "dinov3_vit": "packed", "navit": "navit"}

_MODELS = {}


@pytest.fixture(autouse=True)
def _no_autograd():
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: thread start-up dominates, and a shared CI box has few cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(name):
    if name not in _MODELS:
        cls, cfg = FAMILIES[name]
        torch.manual_seed(0)
        _MODELS[name] = scramble(cls(cfg()).eval())
    return _MODELS[name]


def scramble(model):
    """O(1)-scale random weights and non-zero biases: HF's init (std 0.02, zero biases)
    lets a tiny MobileViT's activations vanish, and zeros would compare equal anyway."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def padded_batch(seed=0):
    """(2, 4, 3, 32, 40) images, true sizes with repeats, odd sizes and empty slots.

    16x32 appears three times and 19x37 crops to it at patch 8 (one shape group); 32x16
    has as many patches as 16x32 (one SigLIP2 group of two shapes) and is black along
    its bottom and right edges and in a block inside, like content, not padding.
    """
    g = torch.Generator().manual_seed(seed)
    sizes = [[(16, 32), (19, 37), (0, 0), (32, 16)],
             [(16, 32), (8, 40), (16, 32), (0, 5)]]
    x = torch.zeros(2, 4, 3, 32, 40)
    for b in range(2):
        for s in range(4):
            h, w = sizes[b][s]
            x[b, s, :, :h, :w] = torch.randn(3, h, w, generator=g)
    x[0, 3, :, 24:, :] = 0
    x[0, 3, :, :, 12:] = 0
    x[0, 3, :, 8:14, 4:10] = 0
    return x, torch.tensor(sizes)


def crops_of(x, dims):
    return [x[b, s, :, :h, :w] for b in range(x.shape[0]) for s in range(x.shape[1])
            for h, w in [dims[b, s].tolist()]]


def alone(model, img):
    """The unmodified model on one image: (tokens (n, D), pooled (D') or None)."""
    params = inspect.signature(model.forward).parameters
    kw = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in params else {}
    with torch.no_grad():
        if model.config.model_type == "navit":  # takes a list of images (whole patches)
            p = model.config.patch_size
            out = model(images=[img[:, :img.shape[1] // p * p, :img.shape[2] // p * p]])
        elif model.config.model_type == "siglip2_vision_model":
            p = model.config.patch_size
            img = img[:, :img.shape[1] // p * p, :img.shape[2] // p * p]
            c, H, W = img.shape
            patches = img.reshape(c, H // p, p, W // p, p).permute(1, 3, 2, 4, 0).reshape(1, -1, p * p * c)
            out = model(pixel_values=patches, pixel_attention_mask=torch.ones(patches.shape[:2]),
                        spatial_shapes=torch.tensor([[H // p, W // p]]))
        else:
            out = model(pixel_values=img[None], **kw)
    hidden = out.last_hidden_state
    tokens = hidden.flatten(2).transpose(1, 2)[0] if hidden.ndim == 4 else hidden[0]
    pooled = getattr(out, "pooler_output", None)
    return tokens, None if pooled is None else pooled.flatten(1)[0]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_batch_equals_one_at_a_time(name):
    model = build(name)
    x, dims = padded_batch()
    out = encode_images(model, x, dims, route="grouped")
    assert out.shape[:2] == (2, 4)
    crops = crops_of(x, dims)
    ref = encode_images_sequentially(model, crops).reshape(2, 4, -1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the embedding is the model's own pooled output, taken from the image alone
    _, pooled = alone(model, crops[0])
    torch.testing.assert_close(out[0, 0], pooled, atol=1e-5, rtol=0)
    empty = (dims == 0).any(-1)
    assert bool((out[empty] == 0).all()) and bool((out[~empty].abs().sum(-1) > 0).all())
    # vision_utils has no width rule for NaViT (its config says `dim`)
    assert out.shape[-1] == (model.config.dim if name == "navit" else image_encoder_size(model))
    # the route of the family's own (packed varlen / NaViT) gives the same numbers
    assert bie.route_for(model) == ROUTE.get(name, "grouped")
    torch.testing.assert_close(encode_images(model, x, dims), ref, atol=1e-5, rtol=0)
    if name in ROUTE:
        again = encode_images_group(model, crops_of(x, dims), max_batch_pixels=600).reshape(2, 4, -1)
        torch.testing.assert_close(again, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_repeatable_and_slot_independent(name):
    model = build(name)
    x, dims = padded_batch()
    a = encode_images(model, x, dims, route="grouped")
    assert torch.equal(a, encode_images(model, x, dims, route="grouped"))
    # the same 16x32 image in another slot of another batch, next to other images
    x2, dims2 = padded_batch(seed=1)
    x2[1, 3] = x[0, 0]
    dims2[1, 3] = dims[0, 0]
    b = encode_images(model, x2, dims2, route="grouped")
    assert rel_err(b[1, 3], a[0, 0]) <= 1e-6
    solo = encode_images_group(model, [x[0, 0, :, :16, :32]], route="grouped")
    assert rel_err(solo[0], a[0, 0]) <= 1e-6


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grouped_backend_equals_model_alone(name):
    model = build(name)
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randn(3, h, w, generator=g) for h, w in [(16, 32), (24, 24), (16, 32), (21, 35)]]
    # black regions inside and along the bottom / right edges must not be taken for padding
    imgs[1][:, 8:16, 8:16] = 0
    imgs[1][:, -8:, :] = 0
    imgs[1][:, :, -8:] = 0
    feats = GroupedEncoder(model, max_batch_tokens=16).encode(imgs)
    assert feats.num_images == 4
    for i, img in enumerate(imgs):
        tokens, pooled = alone(model, img)
        got = feats.unpack()[i]
        assert got.shape == tokens.shape
        assert rel_err(got, tokens) <= 1e-5
        if pooled is not None:
            assert rel_err(feats.pooled[i], pooled) <= 1e-5
        h, w = feats.grid_hw[i].tolist()
        assert feats.num_prefix + h * w == tokens.shape[0]


def test_load_encoder_grouped(tmp_path):
    model = build("swinv2")
    enc = load_encoder(model, backend="grouped", max_batch_tokens=8)
    assert isinstance(enc, GroupedEncoder) and enc.model is model
    imgs = [torch.randn(3, 21, 37), torch.randn(3, 32, 16)]
    feats = enc.encode(imgs)
    for got, img in zip(feats.unpack(), imgs):
        assert rel_err(got, alone(model, img)[0]) <= 1e-5
    # a saved model loads from its directory and gives the same features
    model.save_pretrained(tmp_path)
    again = load_encoder(str(tmp_path), backend="grouped").encode(imgs)
    assert rel_err(again.tokens, feats.tokens) <= 1e-6 and rel_err(again.pooled, feats.pooled) <= 1e-6
    # a preset by name; PackedImages in, as for the packed backend
    vit = load_encoder("tiny-vit", backend="grouped")
    packed = PackedImages.from_images([torch.randn(3, 32, 48), torch.randn(3, 16, 16)], 16)
    feats = vit.encode(packed)
    assert feats.grid_hw.tolist() == [[2, 3], [1, 1]] and feats.num_prefix == 1
    for got, img in zip(feats.unpack(), packed.unpack()):
        assert rel_err(got, alone(vit.model, img)[0]) <= 1e-5


def test_siglip2_batches_shapes_of_equal_patch_count():
    model = build("siglip2")
    x, dims = padded_batch()
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["spatial_shapes"].tolist()),
                                           with_kwargs=True)
    try:
        encode_images(model, x, dims, route="grouped")
    finally:
        hook.remove()
    # 16x32 (x3), 19x37 -> 16x32 and 32x16 share one forward; 8x40 (1x5 patches) runs alone
    assert sorted(sorted(c) for c in calls) == [[[1, 5]], [[2, 4]] * 4 + [[4, 2]]]


def test_nested_structures_and_empty_lists():
    model = build("vit")
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(3, h, w, generator=g) for h, w in [(16, 24), (16, 24), (32, 8)])
    out = encode_nested(model, [[a, [b]], [], [[c], []], c])
    assert isinstance(out, list) and len(out) == 4
    assert out[1] == [] and out[2][1] == []
    for got, img in [(out[0][0], a), (out[0][1][0], b), (out[2][0][0], c), (out[3], c)]:
        assert rel_err(got, alone(model, img)[0]) <= 1e-5
    assert encode_nested(model, []) == []


def test_nested_padded_tensor_with_image_sizes():
    model = build("siglip")
    x, dims = padded_batch()
    out = encode_nested(model, x, image_sizes=dims)
    assert len(out) == 2 and all(len(row) == 4 for row in out)
    for b in range(2):
        for s in range(4):
            h, w = dims[b, s].tolist()
            if h == 0 or w == 0:
                assert out[b][s].shape == (0, 32)
            else:
                assert rel_err(out[b][s], alone(model, x[b, s, :, :h, :w])[0]) <= 1e-5
    # a list of padded (L, C, H, W) tensors with per-sample sizes works the same way
    out2 = encode_nested(model, [x[0], x[1]], image_sizes=[dims[0], dims[1].tolist()])
    assert all(torch.equal(u, v) for r1, r2 in zip(out, out2) for u, v in zip(r1, r2))


def test_cnn_feature_maps_come_back_flattened():
    model = build("resnet")
    img = torch.randn(3, 40, 24)
    (tokens,) = encode_nested(model, [img])
    with torch.no_grad():
        fmap = model(pixel_values=img[None]).last_hidden_state[0]  # (C, h, w)
    assert tokens.shape == (fmap.shape[1] * fmap.shape[2], fmap.shape[0])
    assert rel_err(tokens, fmap.flatten(1).T) <= 1e-5
    feats = GroupedEncoder(model).encode([img])
    assert feats.grid_hw.tolist() == [list(fmap.shape[1:])] and feats.num_prefix == 0
    assert feats.pooled.shape == (1, 16)


def test_max_batch_pixels_chunks_each_shape_group():
    model = build("vit")
    imgs = [torch.randn(3, 16, 16) for _ in range(5)] + [torch.randn(3, 32, 16) for _ in range(2)]
    batches = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: batches.append(tuple(kw["pixel_values"].shape)), with_kwargs=True)
    try:
        chunked = encode_nested(model, imgs, max_batch_pixels=2 * 16 * 16)
    finally:
        hook.remove()
    assert sorted(batches) == sorted([(2, 3, 16, 16)] * 2 + [(1, 3, 16, 16)] + [(1, 3, 32, 16)] * 2)
    whole = encode_nested(model, imgs)
    assert all(rel_err(u, v) <= 1e-6 for u, v in zip(chunked, whole))


def test_without_pooler_the_embedding_is_the_token_mean():
    torch.manual_seed(0)
    model = tf.ViTModel(tf.ViTConfig(**VIT), add_pooling_layer=False).eval()
    x, dims = padded_batch()
    out = encode_images(model, x, dims)
    tokens, pooled = alone(model, x[0, 1, :, :19, :37])
    assert pooled is None
    assert rel_err(out[0, 1], tokens.mean(0)) <= 1e-5


def test_image_smaller_than_a_patch_is_refused_by_name():
    x, dims = padded_batch()
    dims[1, 1] = torch.tensor([5, 30])
    with pytest.raises(ValueError, match=r"image 5: size 5x30 is smaller than one 8x8 patch"):
        encode_images(build("vit"), x, dims, route="grouped")
    # a CNN takes any size the model itself takes
    assert encode_images(build("resnet"), x, dims).shape == (2, 4, 16)


def test_all_slots_empty_and_bad_dimensions():
    model = build("clip")
    x = torch.zeros(1, 2, 3, 16, 16)
    out = encode_images(model, x, torch.zeros(1, 2, 2, dtype=torch.long))
    assert out.shape == (1, 2, 32) and not out.any()
    with pytest.raises(ValueError, match="outside the padded image size 16x16"):
        encode_images(model, x, torch.tensor([[[16, 17], [0, 0]]]))
    with pytest.raises(ValueError, match=r"expected shape \(1, 2, 2\)"):
        encode_images(model, x, torch.zeros(2, 2))


def test_naive_batch_path():
    model = build("vit")
    a, b = torch.randn(3, 16, 16), torch.randn(3, 16, 16)
    # same size: the naive batch is exact; a tensor is used as is
    ref = encode_images_sequentially(model, [a, b])
    assert rel_err(encode_images_batch(model, [a, b]), ref) <= 1e-5
    assert rel_err(encode_images_batch(model, torch.stack([a, b])), ref) <= 1e-5
    # mixed sizes are zero-padded to 16x32: the small image's embedding changes
    c = torch.randn(3, 16, 32)
    naive = encode_images_batch(model, [a, c])
    assert naive.shape == (2, 32) and rel_err(naive[0], ref[0]) > 1e-3
    assert rel_err(encode_images_group(model, [a, c])[0], ref[0]) <= 1e-5


def test_select_layer_penultimate():
    model = build("dinov2")
    img = torch.randn(3, 16, 24)
    feats = GroupedEncoder(model, select_layer=-2).encode([img, img])
    with torch.no_grad():
        ref = model(pixel_values=img[None], output_hidden_states=True).hidden_states[-2][0]
    assert rel_err(feats.unpack()[1], ref) <= 1e-5
    assert feats.pooled is None


def test_a_backend_that_refuses_the_model_raises_instead_of_rerouting(monkeypatch):
    # a spec that asks for the packed route without a recipe (windowed Swin) is an error to
    # see, not a silent detour through the grouped route
    import dataclasses

    from mixres.families import FAMILIES
    spec = FAMILIES.get("swinv2")
    monkeypatch.setitem(FAMILIES._items, "swinv2", dataclasses.replace(spec, backend="packed"))
    assert bie.route_for(build("swinv2")) == "packed"
    x, dims = torch.randn(1, 1, 3, 16, 16), torch.tensor([[[16, 16]]])
    with pytest.raises(ValueError, match="packed backend"):
        encode_images(build("swinv2"), x, dims)
    with pytest.raises(ValueError, match="packed backend"):
        encode_images_group(build("swinv2"), [torch.randn(3, 16, 16)], route="packed")


@pytest.mark.parametrize("broken", ["layers", "embed"])
def test_a_recipe_that_raises_makes_encode_images_raise(monkeypatch, broken):
    import dataclasses

    from mixres.families import FAMILIES

    def fail(*args, **kwargs):
        raise ValueError(f"broken recipe {broken}")

    spec = FAMILIES.get("vit")
    recipe = dataclasses.replace(spec.recipe, **{broken: fail})
    monkeypatch.setitem(FAMILIES._items, "vit", dataclasses.replace(spec, recipe=recipe))
    x, dims = padded_batch()
    with pytest.raises(ValueError, match=f"broken recipe {broken}"):
        encode_images(build("vit"), x, dims)


def test_gradients_flow_like_one_at_a_time():
    model = build("resnet")
    x, dims = padded_batch()
    grads = []
    with torch.enable_grad():
        for fn in (lambda: encode_images(model, x, dims), lambda: encode_images_sequentially(
                model, crops_of(x, dims))):
            model.zero_grad()
            fn().square().sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and rel_err(grads[0], grads[1]) <= 1e-5

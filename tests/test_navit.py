"""Packed NaViT == vit-pytorch's NaViT on each image alone; NaViT as a transformers AutoModel.

References come from vit-pytorch's own forward: an image's tokens are captured with a
forward hook on `navit.transformer` (its output, after the final norm) while the model
runs on that image alone, and its pooled latent with a hook on `navit.mlp_head`'s input.
"""

import pytest
import torch
from transformers import AutoModel
from vit_pytorch import na_vit

from mixres.encoders import get_backend
from mixres.encoders.navit import NaViTEncoder
from mixres.models.navit import NaViTConfig, NaViTModel, tiny_navit
from mixres.packing import PackedImages
from tests.conftest import rel_err

TINY = dict(image_size=128, patch_size=16, num_classes=5, dim=32, depth=2, heads=4, mlp_dim=64,
            dim_head=8)
SIZES = [(48, 80), (112, 32), (64, 64), (16, 128), (96, 48)]  # (H, W) pixels, non-square


def _images(sizes=SIZES):
    return [torch.randn(3, h, w) for h, w in sizes]


def _encode(model, images, **kw):
    enc = NaViTEncoder(model, **kw)
    return enc.encode(PackedImages.from_images(images, enc.patch_size))


def _alone(navit, image):
    """vit-pytorch's forward on one image: (tokens (n, D), pooled (D,), logits)."""
    seen = {}
    hooks = [navit.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o)),
             navit.mlp_head.register_forward_hook(lambda m, i, o: seen.__setitem__("pooled", i[0]))]
    try:
        logits = navit([image])
    finally:
        for h in hooks:
            h.remove()
    return seen["tokens"][0], seen["pooled"][0], logits[0]


@pytest.fixture
def navit():
    return na_vit.NaViT(**TINY).eval()


@torch.no_grad()
def test_each_image_in_mixed_batch_equals_image_alone(navit):
    images = _images()
    feats = _encode(navit, images)
    assert feats.num_prefix == 0 and feats.tokens.shape == (sum(h * w for h, w in SIZES) // 256, 32)
    assert feats.grid_hw.tolist() == [[h // 16, w // 16] for h, w in SIZES]
    for i, (tokens, img) in enumerate(zip(feats.unpack(), images)):
        ref_tokens, ref_pooled, _ = _alone(navit, img)
        assert rel_err(tokens, ref_tokens) <= 1e-5, f"image {i} tokens"
        assert rel_err(feats.pooled[i], ref_pooled) <= 1e-5, f"image {i} pooled"


@torch.no_grad()
def test_the_packed_backend_runs_navit_through_its_family_recipe(navit):
    # NaViT is a family with a Recipe (its own layer runner), so the packed backend takes it too
    from mixres.encoders import load_encoder

    images = _images()
    feats = load_encoder(navit, backend="packed").encode(images)
    for i, img in enumerate(images):
        tokens, pooled, _ = _alone(navit, img)
        assert rel_err(feats.unpack()[i], tokens) <= 1e-5 and rel_err(feats.pooled[i], pooled) <= 1e-5


def test_logits_equal_vit_pytorch_batched_forward(navit):
    images = _images()
    logits = navit.mlp_head(_encode(navit, images).pooled)
    assert rel_err(logits, navit(images)) <= 1e-5
    # vit-pytorch's own grouping (list of lists) flattens to the same images
    assert rel_err(logits, navit([images[:2], images[2:]])) <= 1e-5


@torch.no_grad()
def test_order_and_chunking_do_not_change_features(navit):
    images = _images()
    full = _encode(navit, images)
    perm = [3, 0, 4, 2, 1]
    chunked = _encode(navit, [images[i] for i in perm], max_batch_tokens=20)  # several bins
    for j, i in enumerate(perm):
        assert rel_err(chunked.unpack()[j], full.unpack()[i]) <= 1e-5
        assert rel_err(chunked.pooled[j], full.pooled[i]) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("select_layer", [-2, 0])
def test_select_layer_matches_hidden_states(navit, select_layer):
    # hidden_states[1] is block 0's output: ff's input plus ff's output (the residual);
    # hidden_states[0] is the transformer's input (the embeddings)
    image = _images()[0]
    seen = {}
    if select_layer == -2:
        hook = navit.transformer.layers[0][1].register_forward_hook(
            lambda m, i, o: seen.__setitem__("h", i[0] + o))
    else:
        hook = navit.transformer.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
    navit([image])
    hook.remove()
    feats = _encode(navit, [_images()[1], image], select_layer=select_layer)
    assert feats.pooled is None
    assert rel_err(feats.unpack()[1], seen["h"][0]) <= 1e-5


@torch.no_grad()
def test_pil_images_fit_the_position_tables(navit):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    sizes = [(40, 2000), (2000, 40), (300, 500), (129, 130)]  # (H, W); the table is 8 x 8 patches
    pils = [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in sizes]
    enc = NaViTEncoder(navit)
    feats = enc.encode(pils)
    assert feats.grid_hw.tolist() == [[1, 8], [8, 1], [5, 7], [7, 8]]
    for i, (tokens, img) in enumerate(zip(feats.unpack(), enc.prepare(pils))):
        assert img.abs().max() <= 1.0  # mean = std = 0.5: pixels in [-1, 1]
        assert rel_err(tokens, _alone(navit, img)[0]) <= 1e-5, f"image {i}"


def test_gradients_equal_vit_pytorch():
    navit = na_vit.NaViT(**TINY).train()  # dropout 0: training mode is deterministic
    images = _images()
    navit.mlp_head(_encode(navit, images).pooled).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in navit.named_parameters()}
    navit.zero_grad()
    navit(images).square().sum().backward()
    for n, p in navit.named_parameters():
        assert p.grad is not None and ours[n] is not None, n
        assert rel_err(ours[n], p.grad) <= 1e-5, n


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_variant():
    nested = pytest.importorskip("vit_pytorch.na_vit_nested_tensor")
    navit = nested.NaViT(**TINY).eval()
    images = _images()
    seen = {}
    navit.transformer.register_forward_hook(lambda m, i, o: seen.__setitem__("tokens", o.unbind()))
    with torch.inference_mode():
        ref_logits = navit(images)
        feats = _encode(navit, images)
        assert rel_err(navit.mlp_head(feats.pooled), ref_logits) <= 1e-5
    for i, (tokens, ref) in enumerate(zip(feats.unpack(), seen["tokens"])):
        assert rel_err(tokens, ref) <= 1e-5, f"image {i}"


def test_automodel_round_trip(tmp_path):
    model = AutoModel.from_config(NaViTConfig(**TINY)).eval()
    assert isinstance(model, NaViTModel)
    images = _images()
    with torch.no_grad():
        out = model(images)
        assert rel_err(out.logits, model.navit(images)) <= 1e-5
        # the encoder runs CPU linears on oneDNN-packed weights (mixres.prepacked), the model's
        # own call on the BLAS: the same GEMMs in another summation order
        assert rel_err(out.pooler_output, _encode(model, images).pooled) <= 1e-6
        for tokens, img in zip(out.unpack(), images):
            assert rel_err(tokens, _alone(model.navit, img)[0]) <= 1e-5
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, NaViTModel) and loaded.config.dim == 32
    ref_sd = model.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(images).logits, out.logits)


@torch.no_grad()
def test_hf_style_call_and_loop_backend():
    model = AutoModel.from_config(NaViTConfig(**TINY)).eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (32, 2)  # HF names map
    x = torch.randn(2, 3, 48, 80)
    out = model(pixel_values=x, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 15, 32) and len(out.hidden_states) == 3
    for i in range(2):
        assert rel_err(out.last_hidden_state[i], _alone(model.navit, x[i])[0]) <= 1e-5
    # the per-image "loop" backend runs NaViTModel through that HF-style call
    from mixres.encoders import load_encoder

    images = _images()
    for layer in (-1, -2):
        loop = load_encoder(model, backend="loop", select_layer=layer).encode(images)
        ours = _encode(model, images, select_layer=layer)
        assert all(rel_err(a, b) <= 1e-5 for a, b in zip(ours.unpack(), loop.unpack()))
    with pytest.raises(ValueError, match="either images"):
        model(images, pixel_values=x)


def test_backend_registered_and_errors(navit):
    assert get_backend("navit") is NaViTEncoder
    enc = NaViTEncoder(tiny_navit())
    assert (enc.patch_size, enc.num_prefix, enc.mean_std) == (16, 0, ((0.5,) * 3, (0.5,) * 3))
    with pytest.raises(TypeError, match="NaViT"):
        NaViTEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="image_size"):
        _encode(navit, [torch.randn(3, 160, 32)])  # 10 rows > 128 px / 16
    with pytest.raises(ValueError, match="attention dropout"):
        _encode(na_vit.NaViT(**TINY, dropout=0.1).train(), _images()[:1])


def test_presets_are_deterministic_and_leave_rng_alone():
    state = torch.random.get_rng_state()
    a, b = tiny_navit(), tiny_navit()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not a.training and a.config.dim == 64 and a.config.num_classes == 10
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # registered with mixres.presets: the same weights by name, and usable as an encoder spec
    from mixres.encoders import load_encoder
    from mixres.presets import build, state_digest

    assert state_digest(build("tiny-navit")) == state_digest(a)
    assert isinstance(load_encoder("tiny-navit", backend="navit").model, NaViTModel)


def test_bare_navit_is_recognised_by_its_class(navit):
    # a non-HF model (no config) is found by class: its spec answers what no config can
    from mixres import batch_image_encoder, vision_utils

    assert vision_utils.family(navit) == "navit" == vision_utils.family(tiny_navit())
    assert (vision_utils.patch_size(navit), vision_utils.num_prefix_tokens(navit)) == (16, 0)
    assert vision_utils.hidden_size(navit) == 32
    assert batch_image_encoder.route_for(navit) == "navit"
    images = _images()
    embs = batch_image_encoder.encode_images_group(navit, images)
    for i, img in enumerate(images):
        assert rel_err(embs[i], _alone(navit, img)[1]) <= 1e-5

"""The packed encoder's promise: each image in a mixed batch == the unmodified HF model on
that image alone (tokens, pooled, any select_layer), for every supported family; and the
user's model is exactly as it was afterwards."""

import contextlib
import json

import pytest
import torch
import transformers as T

import mixres
from mixres import vision_utils
from tests.conftest import rel_err

TOL = 1e-5
P = 8  # patch size of the tiny models (DINOv2 included)
GRIDS = [(3, 5), (4, 4), (6, 2), (2, 7), (5, 3)]  # mixed, mostly non-square; (4, 4) is native
_KW = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=P)

FAMILIES = {
    "vit": lambda: T.ViTModel(T.ViTConfig(**_KW)),
    "deit": lambda: T.DeiTModel(T.DeiTConfig(**_KW)),
    "clip": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**_KW)),
    "siglip": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**_KW)),
    "siglip2": lambda: T.Siglip2VisionModel(T.Siglip2VisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        num_patches=16, patch_size=P)),
    "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**_KW)),
    "dinov2-reg": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        num_register_tokens=3, **_KW)),
}
PREFIX = {"vit": 1, "deit": 2, "clip": 1, "siglip": 0, "siglip2": 0, "dinov2": 1, "dinov2-reg": 4}


def build(family):
    torch.manual_seed(0)
    return FAMILIES[family]().eval()


def encoder(model, backend="packed", **kw):
    return mixres.load_encoder(model, backend=backend, **kw)


def images(grids=GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * P, w * P, generator=g) for h, w in grids]


def alone(model, image, select_layer=-1):
    """The unmodified HF vision model on one image: (tokens, pooled)."""
    tower = vision_utils.vision_tower(model)
    # interpolate_pos_encoding=True where the forward takes it; SigLIP2: its NaFlex inputs
    kw = vision_utils.forward_kwargs(tower, image[None])
    with torch.no_grad():
        out = tower(**kw, output_hidden_states=True)
    if select_layer == -1:
        return out.last_hidden_state[0], out.pooler_output[0]
    return out.hidden_states[select_layer][0], None


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(m.config._attn_implementation, m.training) for m in model.modules() if hasattr(m, "config")],
            model.training,
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()))


def assert_untouched(model, snap):
    sd, configs, training, hooks = snapshot(model)
    assert configs == snap[1] and training == snap[2] and hooks == snap[3]
    assert sd.keys() == snap[0].keys() and all(torch.equal(sd[k], snap[0][k]) for k in sd)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_image_equals_the_model_on_it_alone(family):
    model = build(family)
    snap = snapshot(model)
    imgs = images()
    feats = encoder(model).encode(imgs)
    assert_untouched(model, snap)  # before the reference runs (HF's own forward adds capture hooks)
    assert feats.num_prefix == PREFIX[family]
    assert feats.grid_hw.tolist() == [list(g) for g in GRIDS]
    for i, (tokens, img) in enumerate(zip(feats.unpack(), imgs)):
        ref, ref_pooled = alone(model, img)
        assert tokens.shape == ref.shape
        assert rel_err(tokens, ref) <= TOL, (family, i)
        assert rel_err(feats.pooled[i], ref_pooled) <= TOL, (family, i)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("select_layer", [-2, 0])
def test_select_layer_is_hf_hidden_states(family, select_layer):
    model = build(family)
    imgs = images(GRIDS[:4])
    feats = encoder(model, select_layer=select_layer).encode(imgs)
    assert feats.pooled is None
    for tokens, img in zip(feats.unpack(), imgs):
        assert rel_err(tokens, alone(model, img, select_layer)[0]) <= TOL


@pytest.mark.parametrize("whole,family", [(T.CLIPModel, "clip"), (T.SiglipModel, "siglip")])
def test_whole_dual_encoder_uses_its_vision_tower(whole, family):
    cfg_cls = T.CLIPConfig if family == "clip" else T.SiglipConfig
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = whole(cfg_cls(text_config=text, vision_config=_KW)).eval()
    snap = snapshot(model)
    imgs = images()
    feats = encoder(model).encode(imgs)
    assert_untouched(model, snap)
    for i, img in enumerate(imgs):
        ref, ref_pooled = alone(model, img)
        assert rel_err(feats.unpack()[i], ref) <= TOL
        assert rel_err(feats.pooled[i], ref_pooled) <= TOL


@pytest.mark.parametrize("family", ["vit", "siglip2", "dinov2-reg"])
def test_chunking_and_order_do_not_change_results(family):
    model = build(family)
    imgs = images()
    whole = encoder(model).encode(imgs)
    chunked = encoder(model, max_batch_tokens=30).encode(imgs)
    order = [3, 0, 4, 2, 1]
    shuffled = encoder(model).encode([imgs[i] for i in order])
    for i in range(len(imgs)):
        assert rel_err(chunked.unpack()[i], whole.unpack()[i]) <= TOL
        assert rel_err(chunked.pooled[i], whole.pooled[i]) <= TOL
        j = order.index(i)
        assert rel_err(shuffled.unpack()[j], whole.unpack()[i]) <= TOL
        assert rel_err(shuffled.pooled[j], whole.pooled[i]) <= TOL


def gradients(model, imgs, backend):
    """Parameter gradients of a fixed random projection of the features (tokens + pooled)."""
    model.zero_grad()
    feats = encoder(model, backend=backend).encode(imgs, grad=True)  # an eval-mode model asks
    # random weights: a plain sum through a layernorm cancels to ~0 and measures only noise
    g = torch.Generator().manual_seed(1)
    loss = (feats.tokens * torch.randn(feats.tokens.shape, generator=g)).sum() \
        + (feats.pooled * torch.randn(feats.pooled.shape, generator=g)).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_gradients_match(got, ref, tol=1e-4):
    assert got.keys() == ref.keys()
    scale = max(float(g.abs().max()) for g in ref.values())
    for n, g in ref.items():
        if float(g.abs().max()) < 1e-5 * scale:
            continue  # a gradient that is zero in exact arithmetic (key biases under softmax)
        assert rel_err(got[n], g) <= tol, n


@pytest.mark.parametrize("family", ["vit", "siglip", "siglip2", "dinov2"])
def test_gradients_equal_the_per_image_loop(family):
    model = build(family)
    imgs = images(GRIDS[:3])
    packed = gradients(model, imgs, "packed")
    assert any("patch_embedding" in n for n in packed)
    assert_gradients_match(packed, gradients(model, imgs, "loop"))


def test_training_mode_and_weight_updates_are_respected():
    model = build("vit").train()
    snap = snapshot(model)
    enc = encoder(model)
    img = images(GRIDS[:2])
    with torch.no_grad():
        enc.encode(img)
        assert_untouched(model, snap)
        # a changed position table must not be served from the per-grid cache
        model.embeddings.position_embeddings.add_(1.0)
        after = enc.encode(img)
    model.eval()
    assert rel_err(after.unpack()[0], alone(model, img[0])[0]) <= TOL


@pytest.mark.parametrize("family", ["vit", "siglip2"])
def test_bf16_runs_and_stays_close(family):
    model = build(family)
    imgs = images(GRIDS[:3])
    ref = encoder(model).encode(imgs)
    low = encoder(build(family), dtype=torch.bfloat16).encode(imgs)
    assert low.tokens.dtype == torch.bfloat16
    assert rel_err(low.tokens.float(), ref.tokens) < 0.1
    assert rel_err(low.pooled.float(), ref.pooled) < 0.1


def test_bad_select_layer_and_unknown_family_are_named():
    with pytest.raises(ValueError, match="select_layer=-4"):
        encoder(build("vit"), select_layer=-4)
    torch.manual_seed(0)
    swin = T.SwinModel(T.SwinConfig(embed_dim=8, depths=[1], num_heads=[1], image_size=32))
    with pytest.raises(ValueError, match="no recipe for model_type 'swin'"):
        encoder(swin)


def test_pil_images_and_paths_use_the_models_patch_size_and_normalization(tmp_path):
    from PIL import Image

    from mixres.images import preprocess

    # a saved model whose processor normalizes with its own, unusual statistics
    mean, std = (0.2, 0.3, 0.4), (0.6, 0.5, 0.4)
    build("vit").save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "do_normalize": True,
         "image_mean": mean, "image_std": std}))
    g = torch.Generator().manual_seed(0)
    pils = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
            for h, w in [(45, 70), (90, 30)]]
    paths = []
    for i, pil in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        pil.save(paths[-1])

    feats = encoder(str(tmp_path / "model")).encode([pils[0], paths[1]])
    # independently: resize to multiples of the model's patch (8, not the usual 16), normalize
    # with the saved statistics, then the per-image loop on those tensors
    ready = [preprocess(pils[0], P, mean=mean, std=std, max_image_tokens=1024),
             preprocess(paths[1], P, mean=mean, std=std, max_image_tokens=1024)]
    assert [tuple(t.shape[1:]) for t in ready] == [(48, 72), (88, 32)]
    assert feats.grid_hw.tolist() == [[6, 9], [11, 4]]
    ref = encoder(str(tmp_path / "model"), backend="loop").encode(ready)
    for i in range(2):
        assert rel_err(feats.unpack()[i], ref.unpack()[i]) <= TOL
        assert rel_err(feats.pooled[i], ref.pooled[i]) <= TOL


def test_prefix_count_is_stated_once_and_checked_against_the_recipe(monkeypatch):
    # a spec whose prefix count disagrees with what its recipe's embed makes is refused by name
    import dataclasses

    from mixres.families import FAMILIES
    monkeypatch.setitem(FAMILIES._items, "vit", dataclasses.replace(FAMILIES.get("vit"),
                                                                    prefix_tokens=lambda tower: 2))
    with pytest.raises(ValueError, match=r"family 'vit': its spec says 2 prefix token\(s\) per image but "
                                         r"its recipe's embed made 1"):
        encoder(build("vit")).encode(images(GRIDS[:2]))


# many tiny images (rendered words, thumbnails): every attention layout the SDPA backend may
# pick for them (mixres.segments) gives each image what the model gives it alone

WORDS = [(1, 1), (1, 3), (2, 2), (1, 4), (2, 1), (1, 2), (1, 1), (2, 3), (1, 4), (2, 4), (1, 1), (2, 2)] * 3


@pytest.mark.parametrize("family", ["vit", "siglip2", "dinov2-reg"])
def test_many_tiny_images_equal_each_alone_under_every_attention_layout(family):
    from mixres.segments import force_layout

    model = build(family)
    imgs = images(WORDS, seed=1)
    refs = [alone(model, img) for img in imgs]
    for layout in (None, 0, 32, 64, 128):
        with force_layout(layout) if layout is not None else contextlib.nullcontext():
            feats = encoder(model).encode(imgs)
        for i, (tokens, (ref, ref_pooled)) in enumerate(zip(feats.unpack(), refs)):
            assert rel_err(tokens, ref) <= TOL, (family, layout, i)
            assert rel_err(feats.pooled[i], ref_pooled) <= TOL, (family, layout, i)


def test_position_codes_are_computed_once_per_model_not_once_per_encoder(monkeypatch):
    """`mixres.encode(model, batch)` in a loop makes an encoder per call: the position codes
    of a grid seen before come from the model's cache (a cache per encoder resampled every
    grid of every batch), and a changed table is still noticed."""
    import mixres.families.dinov2 as dinov2

    model = build("dinov2")
    calls = []
    real = dinov2.resample_table
    monkeypatch.setattr(dinov2, "resample_table", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    imgs = images()
    first = mixres.encode(imgs, model).pooled
    seen = len(calls)
    assert seen == len(GRIDS)
    again = mixres.encode(imgs, model).pooled
    assert len(calls) == seen and torch.equal(first, again)
    with torch.no_grad():
        model.embeddings.position_embeddings.mul_(1.5)
    changed = mixres.encode(imgs, model).pooled
    assert len(calls) == 2 * seen
    assert rel_err(changed[0], alone(model, imgs[0])[1]) < TOL

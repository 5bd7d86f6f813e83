"""timm models packed: each image of a mixed batch equals the unmodified model on it alone.

The reference is timm itself: `forward_features` (built with dynamic_img_size=True, so it takes
any size and resamples its own position table) and `forward_head(pre_logits=True)`, one image
at a time. Tiny random-init models (pretrained=False, depth 2, width 64).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import rel_err

from mixres import vision_utils
from mixres.encoders import load_encoder
from mixres.loading import UnknownModelError, load_model

SMALL = dict(pretrained=False, num_classes=0, depth=2, embed_dim=64, num_heads=2)
VIT = dict(SMALL, img_size=64, dynamic_img_size=True)
IMAGES16 = [(64, 64), (32, 80), (48, 16), (64, 64), (16, 32)]  # native 64x64 and others
NAFLEX = dict(SMALL, pos_embed_grid_size=(4, 4))

VARIANTS = {
    # name: (architecture, create_model kwargs, image sizes)
    "vit-cls-token": ("vit_tiny_patch16_224", VIT, IMAGES16),
    "vit-no-cls-avg": ("vit_tiny_patch16_224", dict(VIT, class_token=False, global_pool="avg"), IMAGES16),
    "vit-registers": ("vit_tiny_patch16_224", dict(VIT, reg_tokens=4), IMAGES16),
    "vit-no-embed-class": ("vit_tiny_patch16_224", dict(VIT, no_embed_class=True, reg_tokens=2), IMAGES16),
    "vit-map": ("vit_tiny_patch16_224", dict(VIT, global_pool="map"), IMAGES16),
    "vit-fc-norm": ("vit_tiny_patch16_224", dict(VIT, fc_norm=True), IMAGES16),
    "vit-qk-norm-max": ("vit_tiny_patch16_224", dict(VIT, qk_norm=True, global_pool="max"), IMAGES16),
    "deit3": ("deit3_small_patch16_224", VIT, IMAGES16),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", dict(VIT, img_size=56),
                   [(56, 56), (28, 70), (42, 14), (14, 28)]),
    "siglip": ("vit_base_patch16_siglip_224", VIT, IMAGES16),
    "eva02-rope": ("eva02_tiny_patch14_224", dict(VIT, img_size=56), [(56, 56), (28, 70), (42, 14)]),
    "eva02-map-registers": ("eva02_tiny_patch14_224", dict(VIT, img_size=56, global_pool="map",
                                                           num_reg_tokens=2), [(56, 56), (28, 70)]),
    "eva-mixed-rope": ("eva02_tiny_patch14_224", dict(VIT, img_size=56, rope_type="mixed"),
                       [(56, 56), (28, 70), (42, 14)]),
    "eva-rope-gqa": ("eva02_tiny_patch14_224", dict(VIT, img_size=56, num_heads=4, attn_type="rope",
                                                    qkv_fused=False, num_kv_heads=2), [(56, 56), (28, 70)]),
    "naflex-avg-registers": ("naflexvit_base_patch16_gap", NAFLEX, IMAGES16),
    "naflex-map": ("naflexvit_base_patch16_map", NAFLEX, IMAGES16),
    "naflex-factorized": ("naflexvit_base_patch16_parfac_gap", NAFLEX, IMAGES16),
    "naflex-rope-token": ("naflexvit_base_patch16_gap", dict(
        NAFLEX, rope_type="axial", pos_embed="none", class_token=True, global_pool="token"), IMAGES16),
}


def images(sizes):
    return [torch.randn(3, h, w) for h, w in sizes]


def snapshot(model):
    """Weights and every module's plain attributes: what "unchanged afterwards" compares."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    attrs = {name: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, tuple))}
             for name, m in model.named_modules()}
    return state, attrs


def assert_unchanged(model, before):
    state, attrs = snapshot(model)
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)
    assert attrs == before[1]


def assert_matches_alone(model, imgs, encoded, tokens_of=None, pooled_of=None):
    tokens_of = tokens_of or (lambda m, x: m.forward_features(x))
    pooled_of = pooled_of or (lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))
    got = encoded.unpack()
    for i, img in enumerate(imgs):
        with torch.no_grad():
            ref_tokens, ref_pooled = tokens_of(model, img[None])[0], pooled_of(model, img[None])[0]
        assert got[i].shape == ref_tokens.shape, (i, tuple(img.shape))
        assert rel_err(got[i], ref_tokens) <= 1e-5, (i, tuple(img.shape))
        assert rel_err(encoded.pooled[i], ref_pooled) <= 1e-5, (i, tuple(img.shape))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mixed_batch_equals_each_image_alone(name):
    arch, kwargs, sizes = VARIANTS[name]
    model = timm.create_model(arch, **kwargs).eval()
    before = snapshot(model)
    imgs = images(sizes)
    enc = load_encoder(model, backend="packed")
    out = enc.encode(imgs)
    assert out.num_prefix == model.num_prefix_tokens
    assert_matches_alone(model, imgs, out)
    assert_unchanged(model, before)


def test_fixed_size_model_is_exact_at_its_native_size():
    """Built without dynamic_img_size: timm takes only its native size, and that is exact."""
    model = timm.create_model("vit_tiny_patch16_224", **dict(VIT, dynamic_img_size=False)).eval()
    imgs = images([(64, 64), (64, 64)])
    assert_matches_alone(model, imgs, load_encoder(model).encode(imgs))


def test_penultimate_layer_is_the_block_output_before_the_last_block():
    model = timm.create_model("vit_tiny_patch16_224", **dict(VIT, reg_tokens=2)).eval()
    imgs = images(IMAGES16[:3])
    out = load_encoder(model, select_layer=-2).encode(imgs)

    def before_last_block(m, x):
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        return m.blocks[:-1](x)

    for got, img in zip(out.unpack(), imgs):
        with torch.no_grad():
            assert rel_err(got, before_last_block(model, img[None])[0]) <= 1e-5
    assert out.pooled is None


def test_vision_utils_answers_for_timm_models():
    model = timm.create_model("vit_tiny_patch16_224", **dict(
        VIT, reg_tokens=4, pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))))
    assert vision_utils.family(model) == "timm_vit"
    assert vision_utils.patch_size(model) == 16
    assert vision_utils.image_encoder_size(model) == 64
    assert vision_utils.num_prefix_tokens(model) == 5
    assert vision_utils.image_mean_std(model) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    eva = timm.create_model("eva02_tiny_patch14_224", **dict(VIT, img_size=56))
    assert (vision_utils.family(eva), vision_utils.patch_size(eva)) == ("timm_eva", 14)


@pytest.mark.parametrize("arch,kwargs", [
    ("test_resnet", {}),
    ("test_convnext", {}),
    ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=2, depths=(1, 1, 1, 1), embed_dim=32,
                                          num_heads=(1, 1, 2, 2), strict_img_size=False)),
])
def test_other_timm_models_take_the_grouped_route(arch, kwargs):
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval()
    assert vision_utils.family(model) == "timm" and vision_utils.patch_size(model) in (None, 4)
    imgs = images([(64, 64), (32, 96), (64, 64)])
    out = load_encoder(model, backend="grouped").encode(imgs)

    def tokens(m, x):
        f = m.forward_features(x)
        if getattr(m, "output_fmt", "NCHW") == "NHWC":
            f = f.permute(0, 3, 1, 2)
        return f.flatten(2).transpose(1, 2)

    assert_matches_alone(model, imgs, out, tokens_of=tokens)


def test_packed_refuses_a_block_it_cannot_run():
    model = timm.create_model("vit_tiny_patch16_224", **dict(VIT, block_fn=timm.models.vision_transformer
                                                             .ParallelScalingBlock))
    with pytest.raises(ValueError, match="ParallelScalingBlock.*grouped"):
        load_encoder(model, backend="packed")


# loading by name

@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A tiny timm ViT saved the way timm saves for the hub (config.json + weights)."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm_vit")
    model = timm.create_model("vit_tiny_patch16_224", **dict(
        SMALL, img_size=64, dynamic_img_size=True,
        pretrained_cfg_overlay=dict(mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)))).eval()
    save_for_hf(model, folder)
    torch.save(model.state_dict(), folder / "weights.pth")
    return model, folder


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_timm_names_load_real_weights(saved_vit):
    model, folder = saved_vit
    local = load_model(f"timm:local-dir:{folder}")
    assert same_weights(local, model) and local.dynamic_img_size and not local.training
    assert vision_utils.image_mean_std(local) == ((0.4,) * 3, (0.2,) * 3)  # its pretrained_cfg
    assert same_weights(load_model(f"timm:{folder}"), model)
    # timm's own pretrained path, pointed at a checkpoint file
    overlay = load_model("timm:vit_tiny_patch16_224", model_kwargs=dict(
        SMALL, img_size=64, pretrained=True, pretrained_cfg_overlay=dict(file=str(folder / "weights.pth"))))
    assert same_weights(overlay, model) and overlay.dynamic_img_size  # mixres' default
    cnn = load_model("timm:test_resnet", model_kwargs={"pretrained": False})
    assert type(cnn).__name__ == "ResNet"  # no dynamic_img_size argument: built without it


def test_bad_timm_names_fail_with_one_line():
    with pytest.raises(UnknownModelError, match="'timm:no_such_model_xyz'.*Unknown model") as err:
        load_model("timm:no_such_model_xyz", model_kwargs={"pretrained": False})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="model_kwargs are for timm"):
        load_model("tiny-vit", model_kwargs={"pretrained": False})


def test_embed_cli_on_a_folder_with_a_timm_model(saved_vit, tmp_path, capsys):
    from mixres.cli import main
    from mixres.embed import read_features
    from mixres.images import preprocess
    from mixres.workloads import write_photos

    model, folder = saved_vit
    write_photos(tmp_path / "photos", n=5, seed=3, sizes=((24, 90), (24, 90)))
    out = tmp_path / "out"
    args = ["embed", str(tmp_path / "photos"), "--model", f"timm:local-dir:{folder}", "--out", str(out),
            "--max-image-tokens", "16", "--shard-size", "2", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    feats = read_features(out)
    assert len(feats) == 5 and feats.meta["settings"]["mean"] == [0.4, 0.4, 0.4]
    for rec in feats.records():
        img = preprocess(rec.path, 16, max_image_tokens=16, mean=(0.4,) * 3, std=(0.2,) * 3)
        with torch.no_grad():
            ref = model.forward_features(img[None])[0]
            pooled = model.forward_head(ref[None], pre_logits=True)[0]
        assert rel_err(rec.tokens, ref) <= 1e-5 and rel_err(rec.pooled, pooled) <= 1e-5, rec.path
    # --model-kwargs: create_model kwargs as JSON (here: a random-init model of the same shape)
    kw = json.dumps(dict(pretrained=False, img_size=64, depth=2, embed_dim=64, num_heads=2, num_classes=0))
    assert main([*args[:3], "timm:vit_tiny_patch16_224", "--model-kwargs", kw, "--out",
                 str(tmp_path / "out2"), *args[6:]]) == 0
    assert len(read_features(tmp_path / "out2")) == 5
    assert main([*args[:3], "timm:vit_tiny_patch16_224", "--model-kwargs", "{pretrained", "--out",
                 str(tmp_path / "out3"), *args[6:]]) != 0
    assert "--model-kwargs is not valid JSON" in capsys.readouterr().err

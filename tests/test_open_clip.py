"""open_clip image towers packed: each image of a mixed batch equals the unmodified tower on it.

open_clip towers have a fixed position table. An image of the native size is compared with the
tower itself; an image of another size with the tower whose table was resampled to that grid
by timm's `resample_abs_pos_embed` (bicubic, antialiased, class row kept). Tokens: the tower's
token output (`output_tokens=True`); pooled: its pooled output (after `proj`).
"""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
from conftest import rel_err
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from test_timm import assert_unchanged, snapshot

from mixres import vision_utils
from mixres.encoders import load_encoder
from mixres.families import OPENAI_CLIP
from mixres.loading import load_model

BASE = dict(image_size=64, patch_size=16, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=32,
            output_tokens=True)
POOLER = dict(attn_pooler_queries=8, attn_pooler_heads=2)
VARIANTS = {
    "pool-tok": {},
    "pool-avg": dict(pool_type="avg"),
    "ln-after-pool": dict(pool_type="avg", final_ln_after_pool=True),
    "layer-scale": dict(ls_init_value=0.1),
    "coca-attn-pool": dict(attentional_pool=True, **POOLER),
    # open_clip's parallel / cascade poolers apply ln_post at the width: output_dim == width
    "attn-pool-parallel": dict(attentional_pool="parallel", output_dim=64, **POOLER),
    "attn-pool-cascade": dict(attentional_pool="cascade", output_dim=64, **POOLER),
}
SIZES = [(64, 64), (32, 80), (48, 16), (64, 64), (16, 32)]


def images(sizes=SIZES):
    return [torch.randn(3, h, w) for h, w in sizes]


def tower_at(tower, grid):
    """The reference for `grid`: the tower itself at its native grid, else a copy whose table
    timm's resample_abs_pos_embed resampled to it."""
    from timm.layers import resample_abs_pos_embed

    if tuple(grid) == tuple(tower.grid_size):
        return tower
    ref = copy.deepcopy(tower)
    table = resample_abs_pos_embed(tower.positional_embedding[None], new_size=list(grid),
                                   old_size=list(tower.grid_size), num_prefix_tokens=1)[0]
    ref.positional_embedding = torch.nn.Parameter(table.detach())
    return ref


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tower_in_a_mixed_batch_equals_each_image_alone(name):
    tower = VisionTransformer(**{**BASE, **VARIANTS[name]}).eval()
    before = snapshot(tower)
    imgs = images()
    out = load_encoder(tower, backend="packed").encode(imgs)
    assert out.num_prefix == 1
    for img, got, pooled in zip(imgs, out.unpack(), out.pooled):
        ref = tower_at(tower, (img.shape[1] // 16, img.shape[2] // 16))
        with torch.no_grad():
            ref_pooled, ref_tokens = ref(img[None])
            if tower.attn_pool is None:
                got = got[1:]  # the tower's token output is the patches
            else:  # its "tokens" are pooled queries: mixres gives the transformer's output
                ref_tokens = ref.transformer(ref._embeds(img[None]))
        assert rel_err(got, ref_tokens[0]) <= 1e-5, tuple(img.shape)
        assert rel_err(pooled.reshape(-1), ref_pooled[0].reshape(-1)) <= 1e-5, tuple(img.shape)
    assert_unchanged(tower, before)


def test_timm_backed_tower_equals_the_tower_alone():
    """TimmModel: the trunk packed by its timm family, pooled through both heads."""
    tower = TimmModel("test_vit", embed_dim=32, image_size=160, pool="avg", proj="linear").eval()
    before = snapshot(tower)
    imgs = images([(160, 160), (64, 96), (160, 160), (32, 48)])
    out = load_encoder(tower).encode(imgs)
    for img, got, pooled in zip(imgs, out.unpack(), out.pooled):
        ref = tower
        if tuple(img.shape[1:]) != (160, 160):  # timm's own resample of the trunk's table
            ref = copy.deepcopy(tower)
            ref.trunk.set_input_size(img_size=tuple(img.shape[1:]))
        with torch.no_grad():
            assert rel_err(got, ref.trunk.forward_features(img[None])[0]) <= 1e-5
            assert rel_err(pooled, ref(img[None])[0]) <= 1e-5
    assert_unchanged(tower, before)
    assert vision_utils.family(tower) == "open_clip_timm" and vision_utils.patch_size(tower) == 16


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """A tiny whole CLIP saved as open_clip's local-dir (config + preprocess cfg + weights)."""
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "mixres-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "mixres-tiny-clip.json")
    model = open_clip.create_model("mixres-tiny-clip").eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    pp = {"mean": [0.3, 0.3, 0.3], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": pp}))
    return model, folder


def test_open_clip_names_load_the_tower_with_its_weights_and_preprocessing(saved_clip):
    model, folder = saved_clip
    visual = load_model(f"open_clip:local-dir:{folder}")
    assert type(visual).__name__ == "VisionTransformer" and not visual.training
    ref = model.visual.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in visual.state_dict().items())
    assert vision_utils.image_mean_std(visual) == ((0.3,) * 3, (0.25,) * 3)
    tagged = load_model(f"open_clip:mixres-tiny-clip:{folder / 'open_clip_pytorch_model.bin'}")
    assert all(torch.equal(v, ref[k]) for k, v in tagged.state_dict().items())
    assert vision_utils.image_mean_std(tagged) == OPENAI_CLIP  # open_clip's default


def test_whole_clip_model_is_read_through_its_visual_tower(saved_clip):
    model, _ = saved_clip
    imgs = images([(64, 64), (64, 64)])
    out = load_encoder(model).encode(imgs)
    assert vision_utils.family(model) == "open_clip" and vision_utils.image_encoder_size(model) == 64
    with torch.no_grad():
        for img, pooled in zip(imgs, out.pooled):
            assert rel_err(pooled, model.encode_image(img[None])[0]) <= 1e-5


"""DINOv3 ViT in the packed backend: each image of a mixed batch == the unmodified HF model on
that image alone (CLS + register tokens, per-image 2-D RoPE on patch tokens only, layer
scale, final norm, pooled CLS), for the last and earlier layers, with gradients, and the
rotary embedding of the packed sequence bit-equal to HF's rotation of each image."""

import pytest
import torch
import transformers as T
from transformers.models.dinov3_vit import modeling_dinov3_vit as hf

import mixres
from mixres.batch_image_encoder import encode_images, encode_images_sequentially, route_for
from tests.conftest import rel_err
from tests.test_packed_encoder import assert_gradients_match, gradients

TOL = 1e-5
P = 16
R = 4  # register tokens
GRIDS = [(3, 5), (4, 4), (6, 2), (2, 7), (5, 3)]  # mixed, mostly non-square


def build(**overrides):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               num_register_tokens=R, patch_size=P, image_size=64, layerscale_value=0.7)
    torch.manual_seed(0)
    return T.DINOv3ViTModel(T.DINOv3ViTConfig(**{**cfg, **overrides})).eval()


def images(grids=GRIDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * P, w * P, generator=g) for h, w in grids]


def alone(model, image, select_layer=-1):
    """The unmodified HF model on one image: (tokens, pooled)."""
    with torch.no_grad():
        out = model(pixel_values=image[None], output_hidden_states=True)
    if select_layer == -1:
        return out.last_hidden_state[0], out.pooler_output[0]
    return out.hidden_states[select_layer][0], None


def test_each_image_equals_the_model_on_it_alone():
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    imgs = images()
    feats = mixres.load_encoder(model, backend="packed").encode(imgs)
    chunked = mixres.load_encoder(model, backend="packed", max_batch_tokens=40).encode(imgs)
    assert model.config._attn_implementation == impl
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert feats.num_prefix == 1 + R
    assert feats.grid_hw.tolist() == [list(g) for g in GRIDS]
    for i, img in enumerate(imgs):
        ref, ref_pooled = alone(model, img)
        assert feats.unpack()[i].shape == ref.shape == (1 + R + GRIDS[i][0] * GRIDS[i][1], 64)
        assert rel_err(feats.unpack()[i], ref) <= TOL, i
        assert rel_err(feats.pooled[i], ref_pooled) <= TOL, i
        assert rel_err(chunked.unpack()[i], ref) <= TOL, i
        assert rel_err(chunked.pooled[i], ref_pooled) <= TOL, i


@pytest.mark.parametrize("select_layer", [-2, 0])
def test_select_layer_is_hf_hidden_states(select_layer):
    model = build()
    imgs = images(GRIDS[:4])
    feats = mixres.load_encoder(model, backend="packed", select_layer=select_layer).encode(imgs)
    assert feats.pooled is None
    for tokens, img in zip(feats.unpack(), imgs):
        assert rel_err(tokens, alone(model, img, select_layer)[0]) <= TOL


def test_packed_rotary_is_bit_equal_to_hf_rotating_each_image():
    # HF rotates the last cos.shape[-2] tokens and leaves the rest (the prefix) alone; the
    # packed cos/sin carry identity rows at every prefix, so one rotation of the whole packed
    # sequence must give, bit for bit, what HF gives each image alone.
    model = build()
    enc = mixres.load_encoder(model, backend="packed")
    imgs = images()
    packed = enc.pack(imgs)
    emb = enc.recipe.embed(enc.tower, packed, enc.cache)
    cos, sin = emb.layer_kwargs["position_embeddings"]
    assert cos.shape == sin.shape == (emb.hidden.shape[0], 16)
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 4, emb.hidden.shape[0], 16, generator=g) for _ in range(2))
    q_all, k_all = hf.apply_rotary_pos_emb(q, k, cos, sin)
    cu = emb.cu_seqlens.tolist()
    for i, img in enumerate(imgs):
        hf_cos, hf_sin = model.rope_embeddings(img[None])
        s = slice(cu[i], cu[i + 1])
        q_i, k_i = hf.apply_rotary_pos_emb(q[:, :, s], k[:, :, s], hf_cos, hf_sin)
        assert torch.equal(q_all[:, :, s], q_i) and torch.equal(k_all[:, :, s], k_i), i
        assert torch.equal(q_all[:, :, s][:, :, :1 + R], q[:, :, s][:, :, :1 + R])  # prefix untouched


def test_gradients_equal_the_per_image_loop():
    model = build()
    imgs = images(GRIDS[:3])
    packed = gradients(model, imgs, "packed")
    assert {"embeddings.cls_token", "embeddings.register_tokens",
            "embeddings.patch_embeddings.weight"} <= packed.keys()
    assert_gradients_match(packed, gradients(model, imgs, "loop"))


def test_training_mode_draws_each_images_coordinate_augmentation_like_the_loop():
    # HF jitters / rescales RoPE coordinates in training (one draw per forward); packed draws
    # once per image in input order, exactly as the per-image loop does with the same seed.
    model = build(pos_embed_shift=0.1, pos_embed_jitter=1.5, pos_embed_rescale=2.0).train()
    imgs = images(GRIDS[:3])
    out = {}
    for backend in ("packed", "loop"):
        torch.manual_seed(7)
        with torch.no_grad():
            out[backend] = mixres.load_encoder(model, backend=backend).encode(imgs)
    eval_feats = mixres.load_encoder(model.eval(), backend="packed").encode(imgs)
    assert rel_err(out["packed"].tokens, eval_feats.tokens) > 1e-3  # the augmentation did act
    for i in range(len(imgs)):
        assert rel_err(out["packed"].unpack()[i], out["loop"].unpack()[i]) <= TOL, i


def test_bf16_runs_and_stays_close():
    imgs = images(GRIDS[:3])
    ref = mixres.load_encoder(build(), backend="packed").encode(imgs)
    low = mixres.load_encoder(build(), backend="packed", dtype=torch.bfloat16).encode(imgs)
    assert low.tokens.dtype == torch.bfloat16
    assert rel_err(low.tokens.float(), ref.tokens) < 0.1
    assert rel_err(low.pooled.float(), ref.pooled) < 0.1


def test_saved_model_and_encode_images_take_the_packed_route(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    assert mixres.load_encoder(str(tmp_path)).backend == "packed"
    assert route_for(model) == "packed"
    imgs = images(GRIDS[:4])
    padded = torch.zeros(2, 2, 3, 7 * P + 5, 7 * P + 3)
    dims = torch.zeros(2, 2, 2, dtype=torch.long)
    for n, img in enumerate(imgs):
        b, s = divmod(n, 2)
        padded[b, s, :, :img.shape[1], :img.shape[2]] = img
        dims[b, s] = torch.tensor(img.shape[1:])
    embs = encode_images(model, padded, dims)
    ref = encode_images_sequentially(model, imgs)
    assert embs.shape == (2, 2, 64)
    assert rel_err(embs.reshape(4, 64), ref) <= TOL

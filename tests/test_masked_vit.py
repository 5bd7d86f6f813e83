"""masked_vit_patcher: a patched HF ViT on a zero-padded mixed batch == each image alone."""

import copy

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

from mixres import presets
from mixres.encoders import get_backend, load_encoder
from mixres.encoders.masked import MaskedViTEncoder, _padding_groups
from mixres.masked_vit_patcher import (
    content_grid,
    is_patched,
    patch_vit,
    unpatch_vit,
)
from mixres.packing import PackedImages
from tests.conftest import rel_err

P = 8
SIZES = [(32, 32), (16, 40), (48, 24), (8, 8)]  # 32x32 is the native size (no interpolation)


def config(**kw):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                image_size=32, patch_size=P, encoder_stride=P, num_labels=5)
    return ViTConfig(**{**base, **kw})


def images(sizes=SIZES):
    return [torch.randn(3, h, w) for h, w in sizes]


def black_edged(h=24, w=32):
    """Content that is exactly 0 (the pad value) inside and along its bottom and right edge."""
    img = torch.randn(3, h, w)
    img[:, 8:16, 8:16] = 0
    img[:, -P:, :] = 0
    img[:, :, -P:] = 0
    return img


def pad(imgs):
    H, W = max(i.shape[1] for i in imgs), max(i.shape[2] for i in imgs)
    batch = torch.zeros(len(imgs), 3, H, W)
    for k, img in enumerate(imgs):
        batch[k, :, :img.shape[1], :img.shape[2]] = img
    sizes = torch.tensor([list(i.shape[1:]) for i in imgs])
    return batch, sizes


def valid(tokens, k, size, padded_hw):
    """Image k's CLS and content tokens (row-major) out of a padded (B, 1 + gh*gw, D) output."""
    gh, gw = padded_hw[0] // P, padded_hw[1] // P
    grid = tokens[k, 1:].reshape(gh, gw, -1)[:size[0] // P, :size[1] // P]
    return torch.cat([tokens[k, :1], grid.reshape(-1, tokens.shape[-1])])


def padding_of(tokens, k, size, padded_hw):
    gh, gw = padded_hw[0] // P, padded_hw[1] // P
    grid = tokens[k, 1:].reshape(gh, gw, -1).clone()
    grid[:size[0] // P, :size[1] // P] = 0
    return grid


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_each_image_in_a_padded_batch_equals_the_image_alone(attn):
    model = ViTModel(config(attn_implementation=attn)).eval()
    # + an image whose size is no multiple of the patch: HF's conv drops the remainder
    imgs = images() + [black_edged(), torch.randn(3, 20, 30)]
    refs = [model(i[None], interpolate_pos_encoding=True) for i in imgs]
    batch, sizes = pad(imgs)
    patch_vit(model)
    out = model(batch, image_sizes=sizes)
    for k, (img, ref) in enumerate(zip(imgs, refs)):
        assert rel_err(valid(out.last_hidden_state, k, img.shape[1:], batch.shape[2:]),
                       ref.last_hidden_state[0]) <= 1e-5, k
        assert rel_err(out.pooler_output[k], ref.pooler_output[0]) <= 1e-5, k
    assert model.config._attn_implementation == attn  # no forced eager


@torch.no_grad()
def test_padded_outputs_are_exactly_zero_and_empty_images_give_zeros():
    model = patch_vit(ViTModel(config()).eval())
    imgs = images()
    batch, sizes = pad(imgs)
    batch[:, :, 20:, 20:] = 7.0  # garbage in the padding must not matter
    batch = torch.cat([batch, torch.randn(1, *batch.shape[1:])])  # plus an image that is all padding
    sizes = torch.cat([sizes, torch.zeros(1, 2, dtype=torch.long)])
    out = model(batch, image_sizes=sizes, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    for hidden in (*out.hidden_states, out.last_hidden_state):
        assert torch.isfinite(hidden).all()
        for k, size in enumerate(sizes.tolist()):
            assert padding_of(hidden, k, size, batch.shape[2:]).abs().max() == 0
        assert hidden[-1].abs().max() == 0  # the empty image: no CLS either
    assert out.pooler_output[-1].abs().max() == 0
    assert out.pooler_output[:-1].abs().min() > 0


@torch.no_grad()
def test_classification_logits_equal_standalone_logits():
    model = ViTForImageClassification(config()).eval()
    imgs = images()
    refs = [model(i[None], interpolate_pos_encoding=True).logits[0] for i in imgs]
    batch, sizes = pad(imgs)
    batch = torch.cat([batch, torch.zeros(1, *batch.shape[1:])])
    sizes = torch.cat([sizes, torch.zeros(1, 2, dtype=torch.long)])
    patch_vit(model)
    out = model(batch, image_sizes=sizes, output_hidden_states=True, labels=torch.arange(5))
    for k, ref in enumerate(refs):
        assert rel_err(out.logits[k], ref) <= 1e-5, k
    assert out.logits[-1].abs().max() == 0
    assert torch.isfinite(out.loss)
    for hidden in out.hidden_states:
        for k, size in enumerate(sizes.tolist()):
            assert padding_of(hidden, k, size, batch.shape[2:]).abs().max() == 0


@torch.no_grad()
def test_masked_image_modeling_reconstructs_each_content_region():
    model = ViTForMaskedImageModeling(config()).eval()
    imgs = images([(24, 24), (16, 40), (32, 32)])
    square = [model(i[None], interpolate_pos_encoding=True).reconstruction[0] for i in (imgs[0], imgs[2])]
    batch, sizes = pad(imgs)
    patch_vit(model)
    out = model(batch, image_sizes=sizes)
    assert out.reconstruction.shape == batch.shape
    assert torch.isfinite(out.reconstruction).all()
    # HF can only run square images alone; their content regions must match exactly
    assert rel_err(out.reconstruction[0, :, :24, :24], square[0]) <= 1e-5
    assert rel_err(out.reconstruction[2, :, :32, :32], square[1]) <= 1e-5
    for k, (h, w) in enumerate(sizes.tolist()):
        outside = out.reconstruction[k].clone()
        outside[:, :h, :w] = 0
        assert outside.abs().max() == 0
    masked = torch.rand(3, (batch.shape[2] // P) * (batch.shape[3] // P)) < 0.5
    out = model(batch, image_sizes=sizes, bool_masked_pos=masked)
    assert torch.isfinite(out.loss) and torch.isfinite(out.reconstruction).all()


@pytest.mark.parametrize("cls", [ViTModel, ViTForImageClassification, ViTForMaskedImageModeling])
@torch.no_grad()
def test_unpatch_restores_exactly_and_patching_twice_is_patching_once(cls):
    model = cls(config()).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x, output_hidden_states=True).to_tuple()
    attrs = {m: dict(vars(m)) for m in model.modules()}
    hooks = {m: list(m._forward_hooks) for m in model.modules()}  # HF's own capture hooks
    patch_vit(model)
    batch, sizes = pad(images())
    once = model(batch, image_sizes=sizes).to_tuple()
    patch_vit(model)
    assert all(torch.equal(a, b) for a, b in zip(once, model(batch, image_sizes=sizes).to_tuple()))
    vit = model if cls is ViTModel else model.vit
    assert all(len(layer._forward_hooks) == len(hooks[layer]) + 1 for layer in vit.layers)
    unpatch_vit(model)
    assert not is_patched(model)
    after = model(x, output_hidden_states=True).to_tuple()
    for a, b in zip(before, after):
        if isinstance(a, tuple):
            assert all(torch.equal(u, v) for u, v in zip(a, b))
        else:
            assert torch.equal(a, b)
    for m in model.modules():
        assert "forward" not in vars(m) and list(m._forward_hooks) == hooks[m]
        assert set(vars(m)) == set(attrs[m]), type(m).__name__


@torch.no_grad()
def test_a_deepcopy_of_a_patched_model_is_patched_on_its_own():
    model = patch_vit(ViTForImageClassification(config()).eval())
    twin = copy.deepcopy(model)
    batch, sizes = pad(images())
    out = twin(batch, image_sizes=sizes, output_hidden_states=True)
    for hidden in out.hidden_states:
        for k, size in enumerate(sizes.tolist()):
            assert padding_of(hidden, k, size, batch.shape[2:]).abs().max() == 0
    assert torch.equal(out.logits, model(batch, image_sizes=sizes).logits)
    unpatch_vit(twin)

    def zeroing_hooks(m):
        return [h for h in m._forward_hooks.values() if h.__name__ == "_zero_padding_hook"]

    assert is_patched(model) and all(len(zeroing_hooks(layer)) == 1 for layer in model.vit.layers)
    assert not is_patched(twin) and not any(zeroing_hooks(m) for m in twin.modules())


@torch.no_grad()
def test_other_instances_and_the_hf_classes_are_unaffected():
    forward, emb_forward = ViTModel.forward, type(ViTModel(config()).embeddings).forward
    other = ViTModel(config()).eval()
    batch, _ = pad(images())
    ref = other(batch, interpolate_pos_encoding=True).last_hidden_state
    patch_vit(ViTModel(config()).eval())
    assert ViTModel.forward is forward and type(other.embeddings).forward is emb_forward
    assert not is_patched(other) and "forward" not in vars(other.embeddings)
    assert torch.equal(other(batch, interpolate_pos_encoding=True).last_hidden_state, ref)


def test_gradients_flow_and_dropout_works_in_train_mode():
    model = patch_vit(ViTModel(config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2)).train())
    imgs = images()
    batch, sizes = pad(imgs)
    a = model(batch, image_sizes=sizes)
    b = model(batch, image_sizes=sizes)
    assert not torch.equal(a.last_hidden_state, b.last_hidden_state)  # dropout is active
    for k, size in enumerate(sizes.tolist()):
        assert padding_of(a.last_hidden_state, k, size, batch.shape[2:]).abs().max() == 0
    (a.last_hidden_state.square().mean() + a.pooler_output.sum()).backward()
    emb = model.embeddings
    for p in (emb.position_embeddings, emb.cls_token, emb.patch_embeddings.projection.weight,
              model.layers[0].attention.q_proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    # a training step changes the position table: no stale cached encodings afterwards
    model.eval()
    with torch.no_grad():
        model(batch, image_sizes=sizes)  # fills the cache
        emb.position_embeddings.add_(torch.randn_like(emb.position_embeddings))
        out = model(batch, image_sizes=sizes).last_hidden_state
        unpatch_vit(model)
        for k, img in enumerate(imgs):
            ref = model(img[None], interpolate_pos_encoding=True).last_hidden_state[0]
            assert rel_err(valid(out, k, img.shape[1:], batch.shape[2:]), ref) <= 1e-5, k


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    model = patch_vit(ViTModel(config()).train())
    batch, sizes = pad(images())

    def grads():
        model.zero_grad()
        out = model(batch, image_sizes=sizes, output_hidden_states=True)
        # an intermediate layer's CLS too (padded rows of intermediate layers: see the module docstring)
        (out.last_hidden_state.square().sum() + out.hidden_states[1][:, 0].sum()).backward()
        return torch.cat([p.grad.flatten() for p in model.layers.parameters()])

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert rel_err(grads(), plain) <= 1e-6


@torch.no_grad()
def test_pad_value_fallback_finds_padding_and_misses_black_borders():
    model = ViTModel(config()).eval()
    imgs = images([(16, 40), (40, 16)])
    edged = black_edged()
    batch, sizes = pad(imgs + [edged])
    assert content_grid(batch, P).tolist() == [[2, 5], [5, 2], [2, 3]]  # documented limitation:
    assert (sizes // P).tolist()[2] == [3, 4]  # the black bottom row and right column are lost
    refs = [model(i[None], interpolate_pos_encoding=True).last_hidden_state[0] for i in imgs]
    patch_vit(model)
    out = model(batch).last_hidden_state  # no image_sizes: padding guessed from zeros
    for k, img in enumerate(imgs):
        assert rel_err(valid(out, k, img.shape[1:], batch.shape[2:]), refs[k]) <= 1e-5
    shifted = batch - 1.0  # another pad value works the same
    assert content_grid(shifted, P, pad_value=-1.0).tolist() == [[2, 5], [5, 2], [2, 3]]


@pytest.mark.parametrize("select_layer,max_padding", [(-1, None), (-2, None), (-1, 1.3)])
@torch.no_grad()
def test_masked_backend_gives_each_image_its_own_tokens(select_layer, max_padding):
    model = ViTModel(config()).eval()
    assert get_backend("masked") is MaskedViTEncoder
    enc = MaskedViTEncoder(model, select_layer=select_layer, max_padding=max_padding)
    imgs = images() + [black_edged()]
    packed = PackedImages.from_images(imgs, P)
    if max_padding is not None:  # several padded batches, results back in input order
        assert len(_padding_groups(packed.grid_hw.tolist(), max_padding)) > 1
    feats = enc.encode(packed)
    assert feats.num_prefix == 1 and feats.grid_hw.tolist() == [[h // P, w // P] for h, w in
                                                               [i.shape[1:] for i in imgs]]
    for k, img in enumerate(imgs):
        ref = model(img[None], interpolate_pos_encoding=True, output_hidden_states=True)
        want = ref.last_hidden_state[0] if select_layer == -1 else ref.hidden_states[select_layer][0]
        assert rel_err(feats.unpack()[k], want) <= 1e-5, k
        assert rel_err(feats.pooled[k], ref.pooler_output[0]) <= 1e-5, k
    assert not is_patched(model) and "forward" not in vars(model)  # the user's model is unchanged
    patch_vit(model)
    enc.encode(PackedImages.from_images(imgs, P))
    assert is_patched(model)  # a model the user patched stays patched


@torch.no_grad()
def test_masked_backend_on_a_classifier_has_no_pooled_output():
    model = ViTForImageClassification(config()).eval()
    imgs = images()
    refs = [model.vit(i[None], interpolate_pos_encoding=True).last_hidden_state[0] for i in imgs]
    # a small token budget: several chunks, results back in input order
    feats = MaskedViTEncoder(model, max_batch_tokens=40).encode(PackedImages.from_images(imgs, P))
    assert feats.pooled is None
    for k, ref in enumerate(refs):
        assert rel_err(feats.unpack()[k], ref) <= 1e-5, k


@torch.no_grad()
def test_load_encoder_masked_on_a_preset_and_on_pil_images():
    from PIL import Image

    enc = load_encoder("tiny-vit", backend="masked")
    assert isinstance(enc, MaskedViTEncoder)
    model = presets.build("tiny-vit")
    g = torch.Generator().manual_seed(1)
    pil = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in
           [(40, 70), (64, 64), (90, 30)]]
    feats = enc.encode(pil)
    for k, img in enumerate(enc.prepare(pil)):
        ref = model(img[None], interpolate_pos_encoding=True)
        assert rel_err(feats.unpack()[k], ref.last_hidden_state[0]) <= 1e-5, k
        assert rel_err(feats.pooled[k], ref.pooler_output[0]) <= 1e-5, k
    with pytest.raises(TypeError, match="expected an HF ViT model"):
        load_encoder("tiny-clip", backend="masked")

"""vision_utils tells the truth about every supported family: each answer is checked
against what a tiny random model of that family actually does in a forward pass."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from torch import nn

from mixres import vision_utils as vu

IMAGENET = vu.IMAGENET_DEFAULT
HALF = vu.IMAGENET_STANDARD

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
            vocab_size=99)


@dataclass
class Case:
    build: object          # () -> model
    family: str
    patch: int | None
    prefix: int
    mean_std: tuple
    interpolate: bool      # forward takes interpolate_pos_encoding
    stride: int            # pixels per output token / feature-map cell
    size: tuple = (32, 48)  # non-square, not the config's image_size


def _mobilevit_config():
    return tf.MobileViTConfig(image_size=32, hidden_sizes=[16, 16, 16],
                              neck_hidden_sizes=[8, 8, 8, 8, 8, 16, 32])


CASES = {
    "vit": Case(lambda: tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **VIT)),
                "vit", 8, 1, HALF, True, 8),
    "vit-classifier": Case(
        lambda: tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, **VIT)),
        "vit", 8, 1, HALF, True, 8),
    "deit": Case(lambda: tf.DeiTModel(tf.DeiTConfig(image_size=32, patch_size=8, **VIT)),
                 "deit", 8, 2, IMAGENET, True, 8),
    "clip-vision": Case(
        lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=32, patch_size=8, **VIT)),
        "clip", 8, 1, vu.OPENAI_CLIP, True, 8),
    "clip": Case(lambda: tf.CLIPModel(tf.CLIPConfig(
        text_config=TEXT, vision_config=dict(image_size=32, patch_size=8, **VIT))),
        "clip", 8, 1, vu.OPENAI_CLIP, True, 8),
    "siglip-vision": Case(
        lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=32, patch_size=8, **VIT)),
        "siglip", 8, 0, HALF, True, 8),
    "siglip": Case(lambda: tf.SiglipModel(tf.SiglipConfig(
        text_config=TEXT, vision_config=dict(image_size=32, patch_size=8, **VIT))),
        "siglip", 8, 0, HALF, True, 8),
    "siglip2-vision": Case(
        lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(num_patches=16, patch_size=8, **VIT)),
        "siglip2", 8, 0, HALF, False, 8),
    "siglip2": Case(lambda: tf.Siglip2Model(tf.Siglip2Config(
        text_config=TEXT, vision_config=dict(num_patches=16, patch_size=8, **VIT))),
        "siglip2", 8, 0, HALF, False, 8),
    "dinov2": Case(lambda: tf.Dinov2Model(tf.Dinov2Config(image_size=28, patch_size=7, **VIT)),
                   "dinov2", 7, 1, IMAGENET, False, 7, (28, 42)),
    "dinov2-registers": Case(lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
        image_size=28, patch_size=7, num_register_tokens=3, **VIT)),
        "dinov2_with_registers", 7, 4, IMAGENET, False, 7, (28, 42)),
    "dinov3-vit": Case(lambda: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(
        image_size=32, patch_size=8, num_register_tokens=2, **VIT)),
        "dinov3_vit", 8, 3, IMAGENET, False, 8),
    "dinov3-convnext": Case(lambda: tf.DINOv3ConvNextModel(tf.DINOv3ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1])), "dinov3_convnext", None, 1, IMAGENET, False, 8),
    "convnext": Case(lambda: tf.ConvNextModel(tf.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), "convnext", None, 0, IMAGENET,
        False, 8),
    "resnet": Case(lambda: tf.ResNetModel(tf.ResNetConfig(
        hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)), "resnet", None, 0, IMAGENET,
        False, 8),
    "swinv2": Case(lambda: tf.Swinv2Model(tf.Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
        window_size=4)), "swinv2", 4, 0, IMAGENET, True, 8),
    "mobilevit": Case(lambda: tf.MobileViTModel(_mobilevit_config()),
                      "mobilevit", None, 0, vu.NO_NORMALIZATION, False, 32, (64, 96)),
    "mobilevit-no-expand": Case(lambda: tf.MobileViTModel(_mobilevit_config(), expand_output=False),
                                "mobilevit", None, 0, vu.NO_NORMALIZATION, False, 32, (64, 96)),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: case.build().eval() for name, case in CASES.items()}


def _run_tower(model, size):
    tower = vu.vision_tower(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        return tower(**vu.forward_kwargs(tower, x)).last_hidden_state


@pytest.mark.parametrize("name", CASES)
def test_answers_match_a_real_forward(models, name):
    case, model = CASES[name], models[name]
    assert vu.family(model) == case.family
    assert vu.patch_size(model) == case.patch
    assert vu.num_prefix_tokens(model) == case.prefix
    assert vu.image_mean_std(model) == case.mean_std
    assert ("interpolate_pos_encoding" in vu.model_args_dict(vu.vision_tower(model))) \
        == case.interpolate

    out = _run_tower(model, case.size)
    grid = (case.size[0] // case.stride) * (case.size[1] // case.stride)
    if out.ndim == 4:  # CNN feature map (B, C, h, w)
        assert out.shape[1] == vu.hidden_size(model)
        assert out.shape[2] * out.shape[3] == grid and case.prefix == 0
    else:              # tokens (B, prefix + h*w, D)
        assert out.shape[-1] == vu.hidden_size(model)
        assert out.shape[1] - grid == vu.num_prefix_tokens(model)
    assert vu.pool_hidden_dim(out, vu.hidden_size(model)).shape == (2, vu.hidden_size(model))


def test_original_toolkit_names_agree(models):
    for name, model in models.items():
        assert vu.image_encoder_size(model) == vu.hidden_size(model), name
        assert vu.model_args_dict(model) == ({"interpolate_pos_encoding": True}
                                             if vu.accepts(model, "interpolate_pos_encoding")
                                             else {})


def test_whole_models_answer_for_their_vision_tower(models):
    for name in ("clip", "siglip", "siglip2"):
        whole, tower = models[name], vu.vision_tower(models[name])
        assert tower is whole.vision_model
        assert vu.vision_config(whole) is whole.config.vision_config
        assert vu.hidden_size(whole) == 32 != whole.config.text_config.hidden_size
    assert vu.vision_tower(models["vit-classifier"]) is models["vit-classifier"].vit
    assert vu.vision_tower(models["vit"]) is models["vit"]
    # bare DINOv3 keeps its encoder under its base_model_prefix ("model"): not a tower
    assert vu.vision_tower(models["dinov3-vit"]) is models["dinov3-vit"]


def test_cached_answers_do_not_keep_models_alive():
    import gc
    import weakref

    model = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **VIT))
    assert vu.hidden_size(model) == vu.hidden_size(model) == 32
    vu.num_prefix_tokens(model), vu.patch_size(model), vu.family(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_mobilevit_width_follows_expand_output(models):
    # expand_output=True adds a 1x1 conv to neck_hidden_sizes[-1]; False stops at [-2].
    assert vu.hidden_size(models["mobilevit"]) == 32
    assert vu.hidden_size(models["mobilevit-no-expand"]) == 16


def test_siglip2_naflex_inputs_match_hf_processor(models):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    model = models["siglip2-vision"]
    x = torch.randn(1, 3, 16, 40)
    kwargs = vu.forward_kwargs(model, x)
    assert torch.equal(kwargs["pixel_values"][0], convert_image_to_patches(x[0], 8))
    assert kwargs["spatial_shapes"].tolist() == [[2, 5]]
    assert kwargs["pixel_attention_mask"].shape == (1, 10)
    # already-cut inputs pass through untouched, extra kwargs win
    cut = vu.forward_kwargs(model, kwargs["pixel_values"], spatial_shapes=kwargs["spatial_shapes"])
    assert cut["pixel_values"] is kwargs["pixel_values"] and "pixel_attention_mask" not in cut


def test_patch_size_tuple(models):
    square = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=(8, 8), **VIT))
    assert vu.patch_size(square) == 8
    with pytest.raises(ValueError, match=r"not square"):
        vu.patch_size(tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=[8, 4], **VIT)))


# normalization from saved processors

def test_mean_std_from_saved_preprocessor(tmp_path, models):
    models["vit"].save_pretrained(tmp_path)
    tf.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]).save_pretrained(
        tmp_path)
    expected = ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert vu.image_mean_std(tmp_path) == expected
    assert vu.image_mean_std(str(tmp_path)) == expected
    assert vu.image_mean_std(tf.AutoModel.from_pretrained(tmp_path)) == expected


def test_mean_std_without_preprocessor_uses_the_family(tmp_path, models):
    models["clip"].save_pretrained(tmp_path)
    assert vu.image_mean_std(tmp_path) == vu.OPENAI_CLIP
    assert vu.image_mean_std(tf.AutoModel.from_pretrained(tmp_path)) == vu.OPENAI_CLIP


def test_mean_std_of_saved_mobilevit_processor_is_identity(tmp_path):
    tf.MobileViTImageProcessor().save_pretrained(tmp_path)
    assert vu.image_mean_std(tmp_path) == vu.NO_NORMALIZATION


def test_mean_std_scalar_and_bad_values(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": 0.5, "image_std": [0.25]}))
    assert vu.image_mean_std(tmp_path) == ((0.5,) * 3, (0.25,) * 3)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5], "image_std": [0.25]}))
    with pytest.raises(ValueError, match="image_mean should have 1 or 3 entries"):
        vu.image_mean_std(tmp_path)


def test_mean_std_of_a_dir_with_nothing(tmp_path):
    with pytest.raises(vu.UnknownImageEncoderError, match="no preprocessor_config.json"):
        vu.image_mean_std(tmp_path)


# unknown models

class Mystery(nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = type("MysteryConfig", (), {"model_type": "mystery", **config})()


def test_unknown_models_get_errors_that_name_them():
    with pytest.raises(vu.UnknownImageEncoderError, match=r"Linear has no `config`"):
        vu.hidden_size(nn.Linear(2, 2))
    with pytest.raises(vu.UnknownImageEncoderError,
                       match=r"Mystery: cannot tell its output width.*hidden_size, neck_hidden_"):
        vu.image_encoder_size(Mystery())
    with pytest.raises(vu.UnknownImageEncoderError,
                       match=r"Mystery \(model_type 'mystery'\).*prefix tokens.*known families"):
        vu.num_prefix_tokens(Mystery(hidden_size=8))
    with pytest.raises(vu.UnknownImageEncoderError, match=r"no `patch_size`"):
        vu.patch_size(Mystery())
    assert vu.family(Mystery()) == "mystery"
    assert vu.hidden_size(Mystery(embed_dim=8, depths=[1, 1, 1])) == 32  # Swin-like doubling
    assert issubclass(vu.UnknownImageEncoderError, ValueError)


# accepts

def test_accepts_counts_explicit_parameters_only():
    def f(a, *, b, **kwargs):
        pass

    assert vu.accepts(f, "a") and vu.accepts(f, "b")
    assert not vu.accepts(f, "c") and not vu.accepts(f, "kwargs")
    assert vu.accepts(tf.ViTModel.forward, "interpolate_pos_encoding")
    assert not vu.accepts(tf.DINOv3ViTModel.forward, "interpolate_pos_encoding")
    assert not vu.accepts(len, "x")


def test_pool_hidden_dim():
    assert vu.pool_hidden_dim(torch.randn(2, 7, 5), 5).shape == (2, 5)
    fmap = torch.randn(2, 5, 3, 4)
    assert torch.allclose(vu.pool_hidden_dim(fmap, 5), fmap.mean((2, 3)))
    # L == D: HF token layout decides
    tokens = torch.randn(2, 5, 5)
    assert torch.allclose(vu.pool_hidden_dim(tokens, 5), tokens.mean(1))
    with pytest.raises(ValueError, match="no dim of"):
        vu.pool_hidden_dim(torch.randn(2, 7, 5), 6)


def test_mean_std_of_legacy_mobilevit_feature_extractor(tmp_path):
    # what apple/mobilevit-* ship: no normalization keys at all
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"feature_extractor_type": "MobileViTFeatureExtractor", "size": 288}))
    assert vu.image_mean_std(tmp_path) == vu.NO_NORMALIZATION

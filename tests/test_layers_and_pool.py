"""select_layer is checked at load for every backend; the default pool follows the layer
(encode, load_encoder().encode, `mixres embed`); a single image file is an INPUT of one."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import rel_err

import mixres
from mixres.cli import main
from mixres.embed import embed, encode, read_features
from mixres.workloads import write_photos

KW = dict(max_image_tokens=16, progress=False, shard_size=2)


def _resnet():
    return tf.ResNetModel(tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                          layer_type="basic")).eval()


# every backend, on a 2-layer (or 2-stage) model
BACKENDS = [("packed", "tiny-vit"), ("grouped", "tiny-vit"), ("grouped", "resnet"), ("loop", "tiny-vit"),
            ("loop", "resnet"), ("masked", "tiny-vit"), ("navit", "tiny-navit")]


def _model(name):
    return _resnet() if name == "resnet" else mixres.load_model(name)


@pytest.mark.parametrize("backend,name", BACKENDS)
def test_select_layer_past_the_layers_fails_at_load(backend, name):
    model = _model(name)
    for bad in (5, 3, -4):
        msg = rf"select_layer={bad} is out of range for a model with 2 layers"
        with pytest.raises(ValueError, match=msg) as e:
            mixres.load_encoder(model, backend=backend, select_layer=bad)
        assert "\n" not in str(e.value) and backend in str(e.value)
    with pytest.raises(TypeError, match="select_layer must be an int"):
        mixres.load_encoder(model, backend=backend, select_layer=1.0)
    for good in (2, 0, -3):  # hidden_states[0..2]
        assert mixres.load_encoder(model, backend=backend, select_layer=good).select_layer == good


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, n=3, seed=3, sizes=((24, 90), (24, 90)))
    return sorted(folder.glob("photo_*"))


def test_encode_default_pool_follows_the_layer(photos):
    # last layer: the model's pooler; other layers: the CLS token, else the patch mean
    last = encode(photos, "tiny-vit", max_image_tokens=16)
    assert torch.equal(last.pooled, encode(photos, "tiny-vit", max_image_tokens=16, pool="model").pooled)
    inner = encode(photos, "tiny-vit", select_layer=-2, max_image_tokens=16)
    assert torch.equal(inner.pooled, torch.stack([t[0] for t in inner.unpack()]))
    siglip = encode(photos, "tiny-siglip", select_layer=-2, max_image_tokens=16)  # no CLS token
    assert siglip.num_prefix == 0
    assert rel_err(siglip.pooled, torch.stack([t.mean(0) for t in siglip.unpack()])) <= 1e-6
    # an Encoder passed in keeps its own layer, and the default follows it
    enc = mixres.load_encoder("tiny-vit", select_layer=0, max_image_tokens=16)
    mine = encode(photos, enc)
    assert torch.equal(mine.pooled, torch.stack([t[0] for t in mine.unpack()]))
    with pytest.raises(ValueError, match="pool='model' needs select_layer=-1"):
        encode(photos, "tiny-vit", select_layer=-2, pool="model")


def test_encoder_pooled_is_the_models_pooler_on_the_last_layer_only(photos):
    model = mixres.load_model("tiny-vit")
    imgs = mixres.load_encoder(model).prepare(photos)
    last = mixres.load_encoder(model).encode(imgs)
    with torch.no_grad():
        for img, pooled in zip(imgs, last.pooled):
            ref = model(pixel_values=img[None], interpolate_pos_encoding=True).pooler_output[0]
            assert rel_err(pooled, ref) <= 1e-5
    assert mixres.load_encoder(model, select_layer=-2).encode(imgs).pooled is None


def test_embed_default_pool_follows_the_layer(photos, tmp_path):
    embed([str(p) for p in photos], tmp_path / "api", "tiny-vit", select_layer=-2, **KW)
    out = tmp_path / "cli"
    assert main(["embed", str(photos[0].parent), "--model", "tiny-vit", "--out", str(out), "--select-layer",
                 "-2", "--max-image-tokens", "16", "--num-workers", "0", "--no-progress"]) == 0
    for folder in (tmp_path / "api", out):
        feats = read_features(folder)
        assert feats.meta["settings"]["pool"] == "cls" and feats.meta["settings"]["select_layer"] == -2
        for rec in feats.records():
            assert torch.equal(rec.pooled, rec.tokens[0])


def test_one_image_file_is_an_input_of_one(photos, tmp_path):
    out = tmp_path / "one"
    assert main(["embed", str(photos[1]), "--model", "tiny-vit", "--out", str(out),
                 "--max-image-tokens", "16", "--num-workers", "0", "--no-progress"]) == 0
    feats = read_features(out)
    assert list(feats) == [str(photos[1])]
    alone = encode([photos[1]], "tiny-vit", max_image_tokens=16)
    assert rel_err(feats[0].tokens, alone.tokens) <= 1e-5
    assert rel_err(feats[0].pooled, alone.pooled[0]) <= 1e-5


def test_presets_are_named_in_embed_help_and_the_library_docs(capsys):
    from pathlib import Path

    from mixres.presets import list_presets

    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    said = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    readme = (Path(__file__).resolve().parents[1] / "docs" / "library.md").read_text()
    assert "mixres presets" in said and "## Presets" in readme
    for name in list_presets():
        assert name in said.replace("- ", "-"), name  # argparse may break a name at its hyphen
        assert f"`{name}`" in readme, name

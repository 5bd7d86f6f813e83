"""select_layer is checked at load for every backend."""

from __future__ import annotations

import pytest
import transformers as tf

import mixres


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

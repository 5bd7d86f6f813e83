"""Presets are the same weights everywhere, leave the caller's RNG alone, round-trip through
save_pretrained, run at sizes other than their config's, and fail clearly on unknown names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mixres import loading, presets
from mixres import vision_utils as vu
from mixres.loading import load_model
from mixres.presets import UnknownModelError, build, list_presets, state_digest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-vit", "tiny-clip", "tiny-siglip", "tiny-siglip2", "tiny-dinov2"]
BIG = ["vit-b16", "clip-b16", "siglip-b16", "siglip2-b16", "dinov2-s14"]


def test_registry_lists_exactly_the_named_presets():
    assert set(TINY + BIG) <= set(list_presets())
    assert list_presets() == sorted(presets.PRESETS)
    with pytest.raises(ValueError, match="'tiny-vit' is already registered"):
        presets.register_preset("tiny-vit")(lambda: None)


def test_same_name_same_weights_in_this_process():
    a, b = build("tiny-vit"), build("tiny-vit")
    assert state_digest(a) == state_digest(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training and a.config.mixres_preset == "tiny-vit"


def test_same_name_same_weights_in_another_process():
    code = ("from mixres.presets import build, state_digest; "
            "print(state_digest(build('tiny-vit')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == state_digest(build("tiny-vit"))


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    model = build("tiny-siglip")
    assert torch.equal(torch.get_rng_state(), state)
    # and the caller's seed does not leak into the preset
    torch.manual_seed(7)
    assert state_digest(build("tiny-siglip")) == state_digest(model)


def test_build_ignores_the_default_device():
    with torch.device("meta"):
        model = build("tiny-vit")
    assert next(model.parameters()).device.type == "cpu"
    assert state_digest(model) == state_digest(build("tiny-vit"))


def test_save_pretrained_then_load_model_gives_the_same_weights(tmp_path):
    model = build("tiny-dinov2")
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert type(loaded) is type(model)
    assert state_digest(loaded) == state_digest(model)
    assert loaded.config.mixres_preset == "tiny-dinov2"  # the weights still say they are random
    assert load_model(str(tmp_path)).config.mixres_preset == "tiny-dinov2"


def test_load_model_passes_modules_through_and_builds_presets():
    module = nn.Linear(2, 2)
    assert load_model(module) is module
    assert state_digest(load_model("tiny-clip")) == state_digest(build("tiny-clip"))
    with pytest.raises(TypeError, match="got int"):
        load_model(3)


def test_unknown_name_fails_at_once_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError) as info:
        load_model("tiny-vitt")
    message = str(info.value)
    assert "\n" not in message
    assert "'tiny-vitt' is neither a mixres preset nor a local directory" in message
    assert all(name in message for name in TINY + BIG)
    assert "Did you mean 'tiny-vit'?" in message
    assert isinstance(info.value, ValueError)
    # a name that is no near miss is asked of the Hub (here: offline, so the cache only)
    with pytest.raises(UnknownModelError) as info:
        load_model("someorg/no-such-model")
    message = str(info.value)
    assert "\n" not in message and "Hugging Face Hub could not provide it" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_near_miss_of_a_preset_fails_before_asking_the_hub(monkeypatch):
    def no_hub(*a, **k):
        raise AssertionError("the Hub was asked about a preset typo")
    monkeypatch.setattr(loading.tf.AutoModel, "from_pretrained", no_hub)
    monkeypatch.setattr(loading, "_hub_unreachable", no_hub)
    with pytest.raises(UnknownModelError, match=r"Did you mean 'tiny-vit'\?") as info:
        load_model("tiny-vitt")
    assert "\n" not in str(info.value)


def test_unreachable_hub_is_said_once_at_once(monkeypatch):
    import time

    calls = []
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: "huggingface.co:443: no route")

    def cache_only(name, **kw):
        calls.append(kw.get("local_files_only"))
        raise OSError("not in cache")
    monkeypatch.setattr(loading.tf.AutoModel, "from_pretrained", cache_only)
    t0 = time.perf_counter()
    with pytest.raises(UnknownModelError, match="the Hub is unreachable .*no route.* not in the local cache"):
        load_model("someorg/some-vision-model")
    assert calls == [True] and time.perf_counter() - t0 < 1.0


def test_presets_command_lists_every_preset(capsys):
    from mixres.cli import main

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    assert any(line.startswith("vit-b16") and "width 768, 12 layers, patch 16" in line for line in lines)


def test_build_unknown_name():
    with pytest.raises(UnknownModelError, match=r"unknown preset 'vit-b32'; presets: .*clip-b16"):
        build("vit-b32")


def test_big_presets_have_the_published_shapes():
    # config only: built on the meta device, no weights allocated
    expect = {
        "vit-b16": (768, 12, 12, 16, 224),
        "clip-b16": (768, 12, 12, 16, 224),
        "siglip-b16": (768, 12, 12, 16, 224),
        "siglip2-b16": (768, 12, 12, 16, None),
        "dinov2-s14": (384, 12, 6, 14, 518),
    }
    for name, (hidden, layers, heads, patch, size) in expect.items():
        with torch.device("meta"):
            config = presets.PRESETS[name]().config
        got = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
               config.patch_size, getattr(config, "image_size", None))
        assert got == (hidden, layers, heads, patch, size), name
    with torch.device("meta"):
        assert presets.PRESETS["siglip2-b16"]().config.num_patches == 256
        assert presets.PRESETS["vit-b16"]().pooler is not None


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_run_at_a_non_square_size(name):
    model = build(name)
    assert vu.hidden_size(model) == 64 and model.config.num_hidden_layers == 2
    p = vu.patch_size(model)
    h, w = 3, 5  # not the config's square grid
    x = torch.randn(2, 3, h * p, w * p)
    with torch.no_grad():
        out = model(**vu.forward_kwargs(model, x))
    assert out.last_hidden_state.shape == (2, vu.num_prefix_tokens(model) + h * w, 64)
    assert out.pooler_output.shape == (2, 64)


def test_tiny_siglip2_naflex_padding_does_not_change_valid_tokens():
    # SigLIP2 takes pre-cut patches (B, N, p*p*C), a mask over the N slots and each image's
    # grid; pad one image's 3x5 grid to 16 slots and its valid tokens must not move.
    model = build("tiny-siglip2")
    x = torch.randn(1, 3, 48, 80)
    alone = vu.forward_kwargs(model, x)
    padded = {
        "pixel_values": torch.cat([alone["pixel_values"], torch.zeros(1, 1, 768)], 1),
        "pixel_attention_mask": torch.tensor([[1] * 15 + [0]]),
        "spatial_shapes": alone["spatial_shapes"],
    }
    with torch.no_grad():
        a, b = model(**alone), model(**padded)
    torch.testing.assert_close(b.last_hidden_state[:, :15], a.last_hidden_state)
    torch.testing.assert_close(b.pooler_output, a.pooler_output)

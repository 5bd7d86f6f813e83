"""CPU linear layers on packed oneDNN weights (`mixres.prepacked`): the same numbers as the
model's own GEMM, batch-independent bit for bit, fresh after a weight changes, and nothing
of the model touched."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixres import prepacked
from mixres.prepacked import packed_linear, prepack_available, prepacked_linears

pytestmark = pytest.mark.skipif(not prepack_available(), reason="torch built without oneDNN")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [(7, 48), (2, 5, 48), (1, 300, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_is_the_same_gemm(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 96, bias=bias)
    x = torch.randn(shape)
    with torch.inference_mode():
        ref = lin(x)
        with prepacked_linears():
            got = lin(x)
    assert got.shape == ref.shape
    assert _rel(got, ref) < 1e-5
    assert lin.weight in prepacked._PACKED  # it did take the packed path


def test_a_rows_output_does_not_depend_on_how_many_rows_share_the_call():
    # what lets a resumed `mixres embed` run equal an uninterrupted one bit for bit
    torch.manual_seed(0)
    w, b = torch.randn(192, 64) * 0.1, torch.randn(192)
    x = torch.randn(1100, 64)
    with torch.inference_mode():
        full = packed_linear(x, w, b)
        for rows in (1, 2, 3, 7, 16, 100, 1099):
            for start in (0, 1):
                part = packed_linear(x[start:start + rows].clone(), w, b)
                assert torch.equal(part, full[start:start + rows]), (rows, start)


def test_a_changed_weight_is_packed_again():
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    x = torch.randn(4, 32)
    with torch.no_grad(), prepacked_linears():
        before = lin(x)
        lin.weight.mul_(2)  # what an optimizer step or load_state_dict does: in place
        after = lin(x)
    with torch.no_grad():
        assert _rel(after, lin(x)) < 1e-5
    assert not torch.allclose(before, after)


def test_autograd_keeps_the_models_own_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(3, 16)
    with prepacked_linears():
        y = lin(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert lin.weight.grad is not None
    assert lin.weight not in prepacked._PACKED


def test_nothing_of_the_model_is_touched_and_the_cache_goes_with_the_weight():
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    state = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.inference_mode(), prepacked_linears():
        lin(torch.randn(2, 16))
    assert type(lin).forward is nn.Linear.forward and not lin._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in lin.state_dict().items())
    packed = weakref.ref(prepacked._PACKED[lin.weight][1])
    del lin
    gc.collect()
    assert packed() is None


def test_inference_tensor_weights_and_other_dtypes_take_the_ordinary_path():
    x = torch.randn(4, 8, dtype=torch.float64)
    w = torch.randn(8, 8, dtype=torch.float64)
    assert packed_linear(x, w) is None  # float64: not packed
    with torch.inference_mode():
        wi = torch.randn(8, 8)  # an inference tensor: no version counter to notice a change
        xi = torch.randn(4, 8)
        assert packed_linear(xi, wi) is None
        with prepacked_linears():
            assert torch.equal(F.linear(xi, wi), xi @ wi.T) or _rel(F.linear(xi, wi), xi @ wi.T) < 1e-5


@pytest.mark.skipif(not prepacked._bf16(), reason="no bf16 oneDNN kernels on this CPU")
def test_bf16_packed_linear_matches_the_models_own_bf16_gemm():
    torch.manual_seed(0)
    lin = nn.Linear(64, 128).bfloat16()
    x = torch.randn(50, 64).bfloat16()
    with torch.inference_mode():
        ref32 = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        own = lin(x)
        with prepacked_linears():
            got = lin(x)
    assert got.dtype == torch.bfloat16
    assert _rel(got.float(), ref32) <= 1.5 * _rel(own.float(), ref32) + 1e-3


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MIXRES_CPU_PREPACK", "0")
    assert not prepack_available()
    lin = nn.Linear(8, 8)
    with torch.inference_mode(), prepacked_linears():
        lin(torch.randn(2, 8))
    assert lin.weight not in prepacked._PACKED


@pytest.mark.parametrize("backend,packs", [("loop", False), ("packed", True), ("grouped", True)])
def test_the_encoders_pack_and_the_loop_reference_does_not(backend, packs):
    # the loop backend is what "the model on each image alone" means: its own kernels
    import transformers as tf

    from mixres.encoders import load_encoder

    vit = tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, image_size=32, patch_size=8)).eval()
    images = [torch.randn(3, 32, 48), torch.randn(3, 16, 16)]
    weights = [m.weight for m in vit.modules() if isinstance(m, nn.Linear)]
    load_encoder(vit, backend=backend).encode(images)
    assert [w in prepacked._PACKED for w in weights] == [packs] * len(weights)


def test_a_view_of_a_weight_is_packed_once():
    # families project patches with conv.weight.flatten(1): a new view every forward
    conv = nn.Conv2d(3, 16, 4, 4)
    x = torch.randn(10, 48)
    with torch.inference_mode(), prepacked_linears():
        first = F.linear(x, conv.weight.flatten(1), conv.bias)
        packed = prepacked._PACKED[conv.weight][1]
        again = F.linear(x, conv.weight.flatten(1), conv.bias)
        assert prepacked._PACKED[conv.weight][1] is packed
    assert torch.equal(first, again)

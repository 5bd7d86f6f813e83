"""One way in for an image (mixres.preprocess.Preprocessor) through the library call.

Every input kind a user has in hand encodes exactly as the same image given as a PIL image;
each refused kind fails in one line naming its index; an empty list gives empty features;
`decode="fast"` through `load_encoder().encode`, `mixres.encode` and a VLM training step stays
within the decode tolerance of pil; the library call never tracks gradients, an encoder only
when asked; out of memory halves the encoder's token budget without changing a feature."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image

import mixres
from mixres.images import ImageLoadError
from mixres.preprocess import Preprocessor

MEAN_TOL = 1 / 255  # the decoders' stated tolerance: mean |fast - pil| per image, [0, 1] pixels
KW = dict(max_image_tokens=16)


def jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "JPEG", quality=quality)
    return b.getvalue()


@pytest.fixture(scope="module")
def enc():
    return mixres.load_encoder("tiny-vit", **KW)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    from skimage import data
    return [jpeg(data.astronaut()[::4, ::4]), jpeg(data.coffee()[::3, ::3]), jpeg(data.camera()[::4, ::4])]


def rgb(h=37, w=53, c=3, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def kinds(arr: np.ndarray, tmp_path) -> dict:
    """The same pixels in every form the Preprocessor takes (RGB, HWC uint8 `arr`)."""
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    t = torch.from_numpy(arr)
    return {"path": path, "str path": str(path), "bytes": path.read_bytes(),
            "file-like": io.BytesIO(path.read_bytes()), "numpy HWC uint8": arr,
            "numpy CHW uint8": np.ascontiguousarray(arr.transpose(2, 0, 1)),
            "numpy HWC float": arr / 255.0,
            "numpy CHW float32": (arr.transpose(2, 0, 1) / 255).astype(np.float32),
            "numpy HWC uint16": arr.astype(np.uint16) * 257, "numpy HWC int64": arr.astype(np.int64),
            "tensor CHW uint8": t.permute(2, 0, 1), "tensor HWC uint8": t,
            "tensor HWC float": t.float() / 255}


def test_every_input_kind_encodes_as_its_pil_image(enc, tmp_path):
    arr = rgb()
    forms = kinds(arr, tmp_path)
    ref = enc.encode([Image.fromarray(arr)])
    feats = enc.encode(list(forms.values()))  # all in one mixed batch
    for i, name in enumerate(forms):
        assert rel_err(feats.unpack()[i], ref.unpack()[0]) <= 1e-5, name
        assert rel_err(feats.pooled[i], ref.pooled[0]) <= 1e-5, name


@pytest.mark.parametrize("channels, mode", [(1, "L"), (4, "RGBA")])
def test_gray_and_alpha_pixels_convert_as_pil_converts_them(enc, channels, mode):
    arr = rgb(c=channels)
    if channels == 4:
        arr[..., 3] = np.where(np.arange(arr.shape[1]) < 20, 0, 255)  # transparent columns
    pil = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    hwc = arr if channels == 4 else arr[..., :1]
    chw = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))
    forms = [hwc, hwc[..., 0] if channels == 1 else hwc, chw, chw.float() / 255]
    ref = enc.prepare([pil])[0]
    for i, x in enumerate(enc.prepare(forms)):
        assert torch.equal(x, ref), i
    # a 1-channel float (C, H, W) tensor is pixels, not a normalized tensor to reach the patch embedding
    feats = enc.encode([chw.float() / 255, pil])
    assert rel_err(feats.unpack()[0], feats.unpack()[1]) <= 1e-5


@pytest.mark.parametrize("bad, match", [
    (5, "input 1: expected a path, bytes, a PIL image, a numpy array or a tensor, got int"),
    ({"image": 1}, "input 1: expected a path.*got dict"),
    (np.zeros((5, 5, 2), np.uint8), "input 1: numpy array of shape \\(5, 5, 2\\).*C in 1, 3 or 4"),
    (np.zeros((2, 5, 5, 3), np.uint8)[None], "input 1: numpy array of shape \\(1, 2, 5, 5, 3\\)"),
    (np.full((5, 5, 3), 1.5), "input 1: .*float pixels must be in \\[0, 1\\], got \\[1.5, 1.5\\]"),
    (np.full((5, 5, 3), np.nan), "input 1: .*NaN"),
    (np.full((5, 5, 3), 300), "input 1: .*integer pixels must be in \\[0, 255\\]"),
    (np.zeros((5, 5, 3), bool), "input 1: .*expected integer or float pixels"),
    (np.zeros((0, 5, 3), np.uint8), "input 1: .*empty image"),
    (torch.zeros(3, 30, 32), "input 1: H and W must be positive multiples of patch_size=16.*already resized"),
    ("missing.png", "input 1 \\(missing.png\\): no such file"),
    (b"not an image", "input 1 \\(<bytes>\\): not an image"),
])
def test_refused_inputs_fail_in_one_line_naming_their_index(bad, match):
    pre = Preprocessor(mixres.load_encoder("tiny-vit").facts, **KW)
    with pytest.raises(ImageLoadError, match=match) as info:
        pre([Image.fromarray(rgb()), bad, "never reached.png"])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="(input|image) 1"):  # ready tensors: checked where packed
        mixres.encode([Image.fromarray(rgb()), bad], "tiny-vit", **KW)


def test_empty_lists_give_empty_features(enc):
    feats = enc.encode([])
    assert feats.num_images == 0 and tuple(feats.tokens.shape) == (0, 64) and feats.cu_seqlens.tolist() == [0]
    for pool in ("model", "mean", "cls"):
        pooled = mixres.encode([], "tiny-vit", pool=pool).pooled
        assert tuple(pooled.shape) == (0, 64) and np.asarray(pooled).shape == (0, 64)
    assert mixres.encode([], "tiny-vit", pool="none").pooled is None
    assert Preprocessor(enc.facts)([]) == []


def test_one_input_gives_one_tensor_a_list_a_list_and_the_preprocessor_pickles(enc):
    pre = pickle.loads(pickle.dumps(Preprocessor(enc.facts, decode="fast", **KW)))
    one = pre(rgb())
    assert isinstance(one, torch.Tensor) and one.shape[0] == 3 and one.shape[1] % 16 == 0
    batch = pre(np.stack([rgb(), rgb(seed=1)]))  # a 4-D array is a batch
    assert isinstance(batch, list) and len(batch) == 2 and torch.equal(batch[0], one)
    assert enc.preprocessor.decode == "pil" and (enc.facts.patch_size, enc.facts.num_prefix) == (16, 1)


def test_decode_fast_through_load_encoder_and_mixres_encode_is_within_the_decode_tolerance(enc, photos):
    """fast's features are the encoder's on fast's pixels, which are within the decoders' stated
    tolerance of pil's (tests/test_decode.py bounds what that does to features)."""
    fast_enc = mixres.load_encoder("tiny-vit", decode="fast", **KW)
    pil_px, fast_px = enc.prepare(photos), fast_enc.prepare(photos)
    std = torch.tensor(enc.mean_std[1])[:, None, None]
    for a, b in zip(pil_px, fast_px):
        assert a.shape == b.shape and 0 < float(((b - a) * std).abs().mean()) <= MEAN_TOL
    ref = enc.encode(fast_px)
    for got in (fast_enc.encode(photos), mixres.encode(photos, "tiny-vit", decode="fast", **KW)):
        for i in range(len(photos)):
            assert rel_err(got.unpack()[i], ref.unpack()[i]) <= 1e-5
            assert rel_err(got.pooled[i], ref.pooled[i]) <= 1e-5
    with pytest.raises(ValueError, match="decoder"):
        mixres.load_encoder("tiny-vit", decode="nope")


def test_library_call_never_tracks_gradients_an_encoder_only_when_asked(photos):
    feats = mixres.encode(photos, "tiny-vit", **KW)
    assert not feats.pooled.requires_grad and np.asarray(feats.pooled).shape == (3, 64)
    enc = mixres.load_encoder("tiny-vit", **KW)
    assert not enc.model.training and not enc.encode(photos).tokens.requires_grad
    assert enc.encode(photos, grad=True).tokens.requires_grad
    enc.model.train()
    try:
        assert enc.encode(photos).tokens.requires_grad  # training mode asks
        with torch.no_grad():
            assert not enc.encode(photos).tokens.requires_grad
        assert not mixres.encode(photos, enc).pooled.requires_grad  # the library call never does
    finally:
        enc.model.eval()


def test_out_of_memory_halves_the_budget_and_keeps_every_feature(photos, monkeypatch):
    enc = mixres.load_encoder("tiny-vit", max_batch_tokens=64, **KW)
    ref = mixres.load_encoder("tiny-vit", **KW).encode(photos + photos)
    forward = enc.forward

    def small_device(packed):  # a device that holds 40 tokens at once
        if int(packed.cu_seqlens[-1]) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(packed)

    monkeypatch.setattr(enc, "forward", small_device)
    with pytest.warns(UserWarning, match="max_batch_tokens halved to 32"):
        got = enc.encode(photos + photos)
    assert enc.max_batch_tokens == 32  # halved until a chunk fits, kept for later calls
    for i in range(len(ref.unpack())):
        assert rel_err(got.unpack()[i], ref.unpack()[i]) <= 1e-5
    monkeypatch.setattr(enc, "forward", lambda packed: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError, match="one image of 16 tokens alone"):
        enc.encode(photos[:1])


def test_a_vlm_step_with_decode_fast_stays_within_the_tolerance_and_trains_the_encoder(photos):
    from mixres.vlm import build_vlm

    vlm = build_vlm({"encoder": "tiny-vit", "adapter": "mlp2", "lm": "tiny", "max_image_tokens": 16})
    samples = [{"images": [photos[0]], "text": "a <image> b"}, {"images": photos[1:], "text": "two"}]
    pil = vlm.collate(samples)
    vlm.collator.decode = "fast"
    fast = vlm.collate(samples)
    assert torch.equal(fast.images.grid_hw, pil.images.grid_hw)
    std = torch.tensor(vlm.encoder.mean_std[1]).repeat_interleave(16 * 16)  # patches are (c, ph, pw)
    d = ((fast.images.patches - pil.images.patches) * std).abs()
    assert 0 < float(d.mean()) <= MEAN_TOL
    vlm.train()
    losses = []
    for batch in (pil, fast):
        vlm.zero_grad()
        out = vlm(batch)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        grads = [p.grad for p in vlm.encoder.parameters()]
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)  # the encoder trains
    assert abs(losses[1] - losses[0]) <= 1e-2 * abs(losses[0])


def test_avif_files_encode_and_heif_that_pil_cannot_open_goes_to_torchcodec(tmp_path, monkeypatch):
    from mixres import images

    b = io.BytesIO()
    Image.fromarray(rgb()).save(b, "AVIF")
    avif = b.getvalue()
    (tmp_path / "a.avif").write_bytes(avif)
    ref = mixres.encode([Image.open(io.BytesIO(avif))], "tiny-vit", **KW)
    got = mixres.encode(tmp_path, "tiny-vit", **KW)  # a folder: .avif is an image extension
    assert rel_err(got.tokens, ref.tokens) <= 1e-5
    # where PIL cannot identify a HEIF-family file (HEIC without a plugin), TorchCodec decodes it
    by_pil = np.asarray(images.load_image(avif))

    def unidentified(f):
        raise images.UnidentifiedImageError("no plugin")

    monkeypatch.setattr(images.Image, "open", unidentified)
    assert np.array_equal(np.asarray(images.load_image(avif)), by_pil)
    with pytest.raises(ImageLoadError, match="not an image"):  # not HEIF: PIL's reason stands
        images.load_image(b"\x00\x00\x00\x18ftypmp42" + bytes(64))

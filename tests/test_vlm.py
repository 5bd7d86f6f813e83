"""The VLM wrapper's promises, for every strategy x language model it supports:
a sample's logits are the same alone and in a mixed batch, each image brings exactly its
grid's worth of tokens, samples never see each other, gradients and freezes do what they
say, cached generation equals uncached, and nothing is padded on the way."""

import pytest
import torch
from conftest import rel_err

from mixres.vlm import IGNORE, IMAGE, TEXT, VLMConfig, build_vlm

ENC = {"name": "random", "hidden": 32, "patch_size": 8, "num_prefix": 1}
LM = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2}
STRATEGIES = {
    "joint_decoder": "joint_decoder",
    "mot": "mot",
    # Flamingo's gates start at 0 (images ignored); open them so the tests can see images
    "cross_attention": {"name": "cross_attention", "every": 1, "gate_init": 0.5},
}


def make(strategy="joint_decoder", adapter="mlp2", lm=LM, **kw):
    return build_vlm({"encoder": ENC, "adapter": adapter, "strategy": STRATEGIES[strategy],
                      "lm": lm, **kw}).eval()


def img(h, w, seed, p=8):
    return torch.randn(3, h * p, w * p, generator=torch.Generator().manual_seed(seed))


def samples():
    """Samples of different sizes: several images of different grids, none, placeholders or not."""
    return [
        {"images": [img(2, 4, 1)], "text": "a <image> wide one"},
        {"images": [img(4, 2, 2), img(2, 2, 3)], "prompt": "<image> and <image>?", "response": "two"},
        {"images": [], "text": "no image at all"},
        {"images": [img(6, 4, 4)], "prompt": "describe", "response": "a tall picture"},
    ]


def alone(vlm, s):
    return vlm(vlm.collate([s])).logits


# strategy x LM


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=257, eos_token_id=258, pad_token_id=256)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=257, eos_token_id=258, pad_token_id=256)
    path = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


COMBOS = [(s, lm) for lm in ("tiny", "llama", "qwen2") for s in ("joint_decoder", "mot", "cross_attention")]


@pytest.fixture(params=COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def combo(request):
    strategy, lm = request.param
    if lm == "tiny":
        return lambda **kw: make(strategy, **kw)
    path = request.getfixturevalue(f"hf_{lm}")
    return lambda **kw: make(strategy, lm=str(path), tokenizer="bytes", max_seq_tokens=512,
                             max_image_tokens=256, **kw)


def test_sample_alone_equals_in_batch(combo):
    vlm = combo()
    ss = samples()
    out = vlm(vlm.collate(ss))
    assert out.cu_seqlens.numel() == len(ss) + 1
    for s, got in zip(ss, out.unpack()):
        ref = alone(vlm, s)
        assert got.shape == ref.shape
        assert rel_err(got, ref) <= 1e-5


def test_changing_one_image_changes_only_its_sample(combo):
    vlm = combo()
    ss = samples()
    before = vlm(vlm.collate(ss)).unpack()
    ss[1]["images"][1] = img(2, 2, 99)
    after = vlm(vlm.collate(ss)).unpack()
    for i, (a, b) in enumerate(zip(before, after)):
        if i == 1:
            assert rel_err(a, b) > 1e-3
        else:
            assert torch.equal(a, b)


def test_gradients_reach_adapter_and_unfrozen_encoder(combo):
    for frozen in (True, False):
        vlm = combo(freeze={"encoder": frozen}).train()
        out = vlm(vlm.collate(samples()))
        out.loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vlm.adapter.parameters())
        enc = vlm.encoder.proj
        assert (enc.grad is None) if frozen else (enc.grad.abs().sum() > 0)


def test_generation_with_cache_equals_without(combo):
    vlm = combo()
    images = [img(2, 4, 5), img(2, 2, 6)]
    cached = vlm.generate_ids(images, "what is <image> next to <image>?", max_new_tokens=6)
    plain = vlm.generate_ids(images, "what is <image> next to <image>?", max_new_tokens=6,
                             use_cache=False)
    assert cached == plain
    assert len(plain) > 0


def test_nothing_is_padded(combo, monkeypatch):
    vlm = combo()
    ss = samples()
    batch = vlm.collate(ss)
    grids = [(2, 4), (4, 2), (2, 2), (6, 4)]
    assert batch.images.patches.shape[0] == sum(h * w for h, w in grids)
    assert batch.images.grid_hw.tolist() == [list(g) for g in grids]
    # every position is a real text token or a real image token
    n_text = int((batch.modality_ids == TEXT).sum())
    n_img = int((batch.modality_ids == IMAGE).sum())
    assert n_text + n_img == batch.num_tokens == int(batch.cu_seqlens[-1])
    if vlm.strategy.expands_images:
        assert n_img == sum(batch.image_token_counts)
    seen = {}
    adapter_forward = type(vlm.adapter).forward

    def spy_adapter(self, feats):
        seen["adapter_in"] = feats.tokens.shape[0]
        return adapter_forward(self, feats)

    run = vlm.lm.run

    def spy_run(x, ctx):
        seen["lm_in"] = x.shape[0]
        return run(x, ctx)

    monkeypatch.setattr(type(vlm.adapter), "forward", spy_adapter)
    monkeypatch.setattr(vlm.lm, "run", spy_run)
    vlm(batch)
    assert seen["adapter_in"] == sum(h * w + 1 for h, w in grids)  # + 1 prefix token each
    assert seen["lm_in"] == batch.num_tokens


# adapters and token counts


@pytest.mark.parametrize("adapter,keep,per_image", [
    ("linear", False, lambda h, w: h * w),
    ("mlp2", False, lambda h, w: h * w),
    ("mlp2", True, lambda h, w: h * w + 1),
    ("merge2x2", False, lambda h, w: h * w // 4),
    ("merge2x2", True, lambda h, w: h * w // 4 + 1),
])
def test_each_image_brings_its_grid(adapter, keep, per_image):
    vlm = make(adapter={"name": adapter, "keep_prefix": keep})
    ss = samples()
    ss[1]["images"][1] = img(4, 6, 3)   # even grids for every adapter
    ss[0]["images"][0] = img(2, 8, 1)
    batch = vlm.collate(ss)
    grids = [tuple(g) for g in batch.images.grid_hw.tolist()]
    expect = [per_image(h, w) for h, w in grids]
    assert batch.image_token_counts == expect
    feats = vlm.adapter(vlm.encoder(batch.images))
    assert feats.seqlens.tolist() == expect
    assert int((batch.modality_ids == IMAGE).sum()) == sum(expect)
    ref = [vlm(vlm.collate([s])).logits for s in ss]
    for got, r in zip(vlm(batch).unpack(), ref):
        assert rel_err(got, r) <= 1e-5


def test_merge2x2_merges_each_2x2_neighbourhood_of_the_image_grid():
    vlm = make(adapter="merge2x2")
    images = [img(2, 4, 1), img(4, 6, 2)]
    batch = vlm.collate([{"images": images, "text": "x"}])
    feats = vlm.encoder(batch.images)
    out = vlm.adapter(feats).unpack()
    a = vlm.adapter
    for tokens, (h, w), got in zip(feats.unpack(), batch.images.grid_hw.tolist(), out):
        grid = a.norm(tokens[1:]).reshape(h, w, -1)           # drop the prefix token
        blocks = grid.reshape(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(h * w // 4, -1)
        assert rel_err(got, a.net(blocks)) <= 1e-6


def test_merge2x2_rejects_odd_grids_and_resizes_pil_to_even():
    from PIL import Image

    vlm = make(adapter="merge2x2")
    with pytest.raises(ValueError, match="sample 0 image 0.*multiples of 2 patches"):
        vlm.collate([{"images": [img(3, 4, 1)], "text": "odd"}])
    pil = Image.new("RGB", (57, 23), (200, 10, 30))
    batch = vlm.collate([{"images": [pil], "text": "x"}])
    h, w = batch.images.grid_hw[0].tolist()
    assert h % 2 == 0 and w % 2 == 0
    assert batch.image_token_counts == [h * w // 4]


def test_images_as_paths_and_pil(tmp_path):
    from PIL import Image

    vlm = make()
    pil = Image.new("RGB", (40, 24), (0, 128, 255))
    pil.save(tmp_path / "a.png")
    b1 = vlm.collate([{"images": [pil], "text": "<image>"}])
    b2 = vlm.collate([{"images": [str(tmp_path / "a.png")], "text": "<image>"}])
    assert torch.equal(b1.images.patches, b2.images.patches)
    assert b1.image_token_counts == [3 * 5]


# data layout


def test_labels_positions_and_layout():
    vlm = make(adapter="linear")
    s = {"images": [img(1, 2, 1)], "prompt": "ab<image>", "response": "cd"}
    b = vlm.collate([s, {"images": [], "text": "z"}])
    tok = vlm.tokenizer
    # <bos> a b [2 image tokens] c d <eos> | <bos> z <eos>
    assert b.input_ids.tolist() == [tok.bos_id, 97, 98, tok.image_token_id, tok.image_token_id,
                                    99, 100, tok.eos_id, tok.bos_id, 122, tok.eos_id]
    assert b.labels.tolist() == [IGNORE] * 5 + [99, 100, tok.eos_id, IGNORE, 122, tok.eos_id]
    assert b.position_ids.tolist() == list(range(8)) + list(range(3))
    assert b.image_positions.tolist() == [3, 4]
    assert b.text_cu_seqlens.tolist() == [0, 6, 9]
    for v in (vlm, make("cross_attention", adapter="merge2x2")):
        ss = [dict(x, images=[img(2, 4, i) for i in range(len(x["images"]))]) for x in samples()]
        assert [v.collator.num_positions(x) for x in ss] == [int(n) for n in v.collate(ss).cu_seqlens.diff()]
    with pytest.raises(ValueError, match="sample 0: the text has 2 <image> placeholders but the "
                                         "sample has 1 images"):
        vlm.collate([{"images": [img(1, 1, 1)], "text": "<image><image>"}])


def test_loss_is_next_token_cross_entropy_within_each_sample():
    vlm = make()
    ss = samples()
    b = vlm.collate(ss)
    out = vlm(b)
    losses = []
    for s in ss:
        bi = vlm.collate([s])
        full = vlm.lm.head(vlm.strategy.forward(vlm.lm, bi, vlm.image_tokens(bi)))
        lab = bi.labels
        keep = lab[1:] != IGNORE
        losses.append(torch.nn.functional.cross_entropy(full[:-1][keep], lab[1:][keep], reduction="sum"))
        losses.append(keep.sum())
    total = sum(losses[0::2]) / sum(losses[1::2])
    assert rel_err(out.loss, total) <= 1e-5


# config, freezing, budgets


def test_freeze_specs_freeze_exactly_what_they_name():
    vlm = make(freeze={"encoder": True, "lm": True, "lm.blocks.1": False, "lm.norm.weight": False})
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    expect = {n for n, _ in vlm.named_parameters()
              if n.startswith(("adapter.", "lm.blocks.1.")) or n == "lm.norm.weight"}
    assert trainable == expect
    with pytest.raises(ValueError, match="'lm.blokcs' names no module.*lm.blocks"):
        make(freeze={"lm.blokcs": True})


def test_config_from_toml_and_budget_validation(tmp_path):
    path = tmp_path / "vlm.toml"
    path.write_text('encoder = "random"\nadapter = "merge2x2"\nstrategy = "mot"\nmax_seq_tokens = 512\n'
                    '[lm]\nhidden = 32\nlayers = 2\nheads = 4\nkv_heads = 2\nmax_positions = 1024\n'
                    '[freeze]\nencoder = true\n')
    vlm = build_vlm(path)
    assert vlm.config == VLMConfig.from_any(path)
    assert type(vlm.adapter).__name__ == "Merge2x2Adapter" and vlm.strategy.name == "mot"
    assert not any(p.requires_grad for p in vlm.encoder.parameters())
    with pytest.raises(ValueError, match="max_seq_tokens 4096 exceeds.*max positions 1024"):
        build_vlm({"lm": {**LM, "max_positions": 1024}, "max_seq_tokens": 4096})
    with pytest.raises(ValueError, match="unknown keys \\['adaptor'\\]"):
        build_vlm({"adaptor": "mlp2"})
    vlm = make(max_seq_tokens=40, max_image_tokens=16)
    with pytest.raises(ValueError, match="sample 0: 4[0-9] LM positions exceed max_seq_tokens 40"):
        vlm.collate([{"images": [img(2, 8, 1), img(2, 8, 2)], "text": "x" * 8}])


def test_strategy_is_not_a_submodule_and_hf_lm_budgets_and_names(hf_llama, tmp_path, capsys):
    vlm = make("cross_attention")
    assert all(not k.startswith(("strategy", "tokenizer")) for k in vlm.state_dict())
    assert not any(m is vlm.strategy for m in vlm.modules())
    with pytest.raises(ValueError, match="max_seq_tokens 2048 exceeds.*max positions 512"):
        make(lm=str(hf_llama), tokenizer="bytes")
    # an LM directory without tokenizer files: the byte tokenizer, said in one line
    vlm = make("mot", lm=str(hf_llama), max_seq_tokens=512, max_image_tokens=256)
    assert type(vlm.tokenizer).__name__ == "ByteTokenizer"
    notice = [ln for ln in capsys.readouterr().err.splitlines() if "tokenizer" in ln]
    assert len(notice) == 1 and "has no tokenizer files; using the byte tokenizer" in notice[0]
    # a missing LM is reported as the LM, not as its tokenizer
    with pytest.raises(ValueError, match=r"^lm '.*nowhere': no such directory"):
        make(lm=str(tmp_path / "nowhere"))


def test_cross_attention_with_closed_gates_is_text_only():
    vlm = build_vlm({"encoder": ENC, "strategy": {"name": "cross_attention", "every": 2},
                     "lm": LM}).eval()
    assert [type(b).__name__ for b in vlm.lm.blocks] == [
        "GatedCrossAttentionBlock", "DecoderBlock", "DecoderBlock"]
    s = samples()[0]
    other = dict(s, images=[img(2, 4, 7)])
    assert torch.equal(alone(vlm, s), alone(vlm, other))


# HF language models


@pytest.mark.parametrize("which", ["llama", "qwen2"])
def test_hf_lm_packed_equals_the_unmodified_model_on_each_sample(which, request):
    from transformers import AutoModelForCausalLM

    path = request.getfixturevalue(f"hf_{which}")
    vlm = make(lm=str(path), tokenizer="bytes", max_seq_tokens=512, max_image_tokens=256)
    ref_model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    ss = samples()
    out = vlm(vlm.collate(ss)).unpack()
    for s, got in zip(ss, out):
        b = vlm.collate([s])
        x = vlm.strategy.embed(vlm.lm, b, vlm.image_tokens(b))
        ref = ref_model(inputs_embeds=x[None]).logits[0][b.text_positions]
        assert rel_err(got, ref) <= 1e-5


def test_hf_tokenizer_from_a_local_path_gets_an_image_token(tmp_path, hf_llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("a cat dog is".split())}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tmp_path / "tok")
    vlm = make(lm=str(hf_llama), tokenizer=str(tmp_path / "tok"), max_seq_tokens=512, max_image_tokens=256)
    tok = vlm.tokenizer
    assert tok.grew and tok.image_token_id == 7
    assert tok.encode("a cat<image> is") == [3, 4, 7, 6]
    b = vlm.collate([{"images": [img(1, 3, 1)], "text": "a dog"}])
    assert b.input_ids.tolist() == [1, 7, 7, 7, 3, 5, 2]
    assert vlm(b).logits.shape == (4, 260)


# a real vision encoder (mixres "packed" backend on the tiny-vit preset)


@pytest.mark.parametrize("strategy", ["joint_decoder", "cross_attention"])
def test_real_encoder_alone_equals_batch_and_trains_where_unfrozen(strategy):
    vlm = build_vlm({"encoder": "tiny-vit", "adapter": "merge2x2", "strategy": STRATEGIES[strategy],
                     "lm": LM, "freeze": {"encoder": True, "encoder.model.layers.1": False}})
    assert vlm.encoder.patch_size == 16 and vlm.encoder.num_prefix == 1
    ss = [{"images": [img(2, 4, 1, p=16)], "text": "a <image> b"},
          {"images": [img(4, 2, 2, p=16), img(2, 2, 3, p=16)], "prompt": "q", "response": "r"}]
    batch = vlm.collate(ss)
    assert batch.image_token_counts == [2, 2, 1]
    out = vlm(batch)
    for s, got in zip(ss, out.unpack()):
        assert rel_err(got, alone(vlm, s)) <= 1e-5
    out.loss.backward()
    grads = {n: p.grad for n, p in vlm.encoder.named_parameters()}
    trained = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert trained == {n for n in grads if n.startswith("model.layers.1.")}


def test_encoder_specs_name_backends_and_models():
    from mixres.presets import build

    loop = build_vlm({"encoder": {"name": "loop", "model": "tiny-vit"}, "lm": LM}).eval()
    packed = build_vlm({"encoder": build("tiny-vit"), "lm": LM}).eval()
    assert loop.encoder.backend == "loop" and packed.encoder.backend == "packed"
    s = samples()[1]
    s = dict(s, images=[img(2, 3, 1, p=16), img(1, 5, 2, p=16)])
    assert rel_err(alone(packed, s), alone(loop, s)) <= 1e-5


def test_a_tower_of_your_own_names_its_blocks():
    from mixres.vlm import RandomTower

    tower = RandomTower(hidden=32, patch_size=8)
    del tower.blocks  # a tower written before `blocks` was part of the interface
    with pytest.raises(TypeError, match="tower RandomTower lacks `blocks`"):
        build_vlm({"encoder": tower, "lm": LM})
    tower.blocks = ()
    vlm = build_vlm({"encoder": tower, "lm": LM})
    assert vlm.blocks() == list(vlm.lm.blocks) and len(vlm.blocks()) == LM["layers"]


def test_mot_routes_each_token_to_its_modality_weights():
    vlm = make("mot")
    text_only, with_image = samples()[2], samples()[0]
    before = [alone(vlm, s) for s in (text_only, with_image)]
    with torch.no_grad():
        for block in vlm.lm.blocks:
            block.experts[IMAGE].mlp.down.weight.mul_(3.0)   # only image tokens use these
    after = [alone(vlm, s) for s in (text_only, with_image)]
    assert torch.equal(before[0], after[0])
    assert rel_err(after[1], before[1]) > 1e-4


def test_parts_conform_by_attribute_access_not_getattr_static():
    """A part whose members an nn.Module keeps in _modules conforms on every Python: from
    3.12 `isinstance` on a runtime protocol uses getattr_static and misses them (the GPU
    box's Python 3.12 refused the built-in CausalLM that way)."""
    from torch import nn

    from mixres.vlm.interfaces import LanguageModel, conforms, missing_members

    class LM(nn.Module):
        hidden_size, vocab_size, max_positions = 8, 16, 32

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])  # reached through __getattr__

        def embed(self, ids): ...
        def head(self, h): ...
        def run(self, x, ctx): ...
        def new_cache(self): ...

    assert conforms(LM(), LanguageModel) and missing_members(LM(), LanguageModel) == []
    bare = LM()
    del bare.blocks
    assert not conforms(bare, LanguageModel) and missing_members(bare, LanguageModel) == ["blocks"]

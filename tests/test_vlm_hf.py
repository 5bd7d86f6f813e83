"""Strategies on pretrained HF causal LMs (tiny random Llama and Qwen2 from configs, saved with
save_pretrained): at initialisation cross_attention is the bare LM and mot is joint_decoder;
gradients reach the adapter, the gates and the image experts while the frozen LM stays put;
conversations train only on assistant turns; content accuracy is right with a BPE tokenizer."""

import pytest
import torch
from conftest import rel_err
from test_vlm import ENC, img, samples

from mixres.vlm import IGNORE, build_vlm

LLAMA = dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             bos_token_id=257, eos_token_id=258, pad_token_id=256)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm_dir(request, tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
                          "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model_cls(cfg_cls(**LLAMA)).save_pretrained(path)
    return path


def make(lm_dir, strategy, **kw):
    return build_vlm({"encoder": ENC, "adapter": "mlp2", "strategy": strategy, "lm": str(lm_dir),
                      "tokenizer": "bytes", "max_seq_tokens": 512, "max_image_tokens": 256, **kw}).eval()


@pytest.mark.parametrize("every,blocks", [(1, ["0", "1", "2"]), (2, ["0", "2"])])
def test_cross_attention_at_init_is_the_bare_lm(lm_dir, every, blocks):
    from transformers import AutoModelForCausalLM

    vlm = make(lm_dir, {"name": "cross_attention", "every": every})
    assert list(vlm.lm.xattn) == blocks  # a gated block before every `every`-th HF layer
    bare = AutoModelForCausalLM.from_pretrained(lm_dir, attn_implementation="sdpa").eval()
    ss = samples()
    out = vlm(vlm.collate(ss)).unpack()
    for s, got in zip(ss, out):
        ids = vlm.collate([s]).input_ids  # images stay out: the placeholder is one text token
        assert rel_err(got, bare(input_ids=ids[None]).logits[0]) <= 1e-5
    # the HF model's own modules and weights are untouched
    assert all(k.startswith(("model.", "xattn.")) for k in vlm.lm.state_dict())
    for k, v in bare.state_dict().items():
        assert torch.equal(vlm.lm.model.state_dict()[k], v)


def test_an_lm_passed_in_is_left_as_it_was_given():
    import transformers as tf

    torch.manual_seed(0)
    # 258 ids: the byte tokenizer needs 260, so the VLM grows its vocabulary, not the user's
    mine = tf.LlamaForCausalLM(tf.LlamaConfig(**{**LLAMA, "vocab_size": 258}, attn_implementation="sdpa"))
    mine.eval()
    vlm = build_vlm({"encoder": ENC, "adapter": "mlp2", "lm": mine, "tokenizer": "bytes",
                     "max_seq_tokens": 512, "max_image_tokens": 256}).eval()
    assert mine.config._attn_implementation == "sdpa"
    assert mine.get_input_embeddings().num_embeddings == mine.config.vocab_size == 258
    assert vlm.lm.vocab_size == 260
    # the VLM runs the very same layer weights, through its varlen attention
    assert vlm.lm.model.model.layers[0].mlp.up_proj.weight is mine.model.layers[0].mlp.up_proj.weight
    batch = vlm.collate([{"text": "Hi there"}], add_eos=False)
    got = vlm(batch).logits[:, :258]
    assert rel_err(got, mine(input_ids=batch.input_ids[None]).logits[0]) <= 1e-5


def test_mot_at_init_is_joint_decoder(lm_dir):
    mot, joint = make(lm_dir, "mot"), make(lm_dir, "joint_decoder")
    joint.adapter.load_state_dict(mot.adapter.state_dict())
    batch = mot.collate(samples())
    assert rel_err(mot(batch).logits, joint(batch).logits) <= 1e-5
    # and the image experts are real copies: changing one changes only image-bearing samples
    with torch.no_grad():
        mot.lm.image_experts[0].mlp.down_proj.weight.mul_(3.0)
    after = mot(batch).unpack()
    before = joint(batch).unpack()
    assert rel_err(after[0], before[0]) > 1e-4
    assert rel_err(after[2], before[2]) <= 1e-5  # the text-only sample


@pytest.mark.parametrize("strategy", ["joint_decoder", "mot", "cross_attention"])
def test_gradients_reach_new_parts_and_the_frozen_lm_stays(lm_dir, strategy):
    vlm = make(lm_dir, strategy, freeze={"lm.model": True, "encoder": True}).train()
    lm_before = {k: v.clone() for k, v in vlm.lm.model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        out = vlm(vlm.collate(samples()))
        out.loss.backward()
        grads = {n: p.grad for n, p in vlm.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("adapter."))
    if strategy == "cross_attention":
        gates = [g for n, g in grads.items() if n.endswith(("gate_attn", "gate_mlp"))]
        assert len(gates) == 2 * 3 and all(g.abs() > 0 for g in gates)
    if strategy == "mot":
        experts = [g for n, g in grads.items() if n.startswith("lm.image_experts.")]
        assert experts and all(g is not None and g.abs().sum() > 0 for g in experts)
    for k, v in vlm.lm.model.state_dict().items():
        assert torch.equal(v, lm_before[k]), k


# data: conversations, chat templates, content accuracy


def _bpe_tokenizer(path, chat_template=None):
    """A byte-level BPE tokenizer trained here on a few words, saved GPT2-style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    words = "a green circle red square blue triangle top left right what is it picture".split()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator([" ".join(words)] * 50 + words, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(path)
    return path


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _trained_text(vlm, batch):
    lab = batch.labels
    return vlm.tokenizer.decode(lab[lab != IGNORE].tolist())


@pytest.mark.parametrize("template", [False, True])
def test_conversations_train_only_assistant_turns(tmp_path, template):
    tok = _bpe_tokenizer(tmp_path / "tok", CHAT if template else None)
    vlm = build_vlm({"encoder": ENC, "tokenizer": str(tok), "lm": {"hidden": 32, "layers": 1, "heads": 4,
                                                                     "kv_heads": 2}})
    conv = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a red square"},
            {"from": "human", "value": "and <image>?"}, {"from": "gpt", "value": "a green circle"}]
    batch = vlm.collate([{"images": [img(2, 2, 1), img(2, 3, 2)], "conversations": conv}])
    assert batch.image_token_counts == [4, 6]
    trained = _trained_text(vlm, batch)
    assert "what" not in trained and "and" not in trained
    assert "a red square" in trained and "a green circle" in trained
    text = vlm.tokenizer.decode(batch.input_ids.tolist())
    assert ("<|user|>" in text) == template


def test_content_accuracy_with_a_bpe_tokenizer(tmp_path):
    """Perfect predictions score 1: word spans come from one tokenization's offsets (encoding
    prefixes separately gave an empty span to every word after a space)."""
    from mixres.vlm.training.metrics import content_hits, token_spans, word_spans

    tok = _bpe_tokenizer(tmp_path / "tok")
    vlm = build_vlm({"encoder": ENC, "tokenizer": str(tok), "lm": {"hidden": 32, "layers": 1, "heads": 4,
                                                                     "kv_heads": 2}})
    response = "a green circle top left"
    spans = token_spans(vlm.tokenizer, response, word_spans(response))
    assert all(b > a for a, b in spans) and spans[0] == (0, 1)
    batch = vlm.collate([{"images": [img(2, 2, 1)], "prompt": "picture:", "response": response}])
    # logits that predict every next token exactly
    V = vlm.lm.vocab_size
    nxt = torch.cat([batch.labels[1:], batch.labels[:1]])
    logits = torch.nn.functional.one_hot(nxt.clamp_min(0), V).float()[batch.text_positions]
    meta = [{"response": response, "content_spans": word_spans(response)}]
    assert content_hits(batch, logits, meta, vlm.tokenizer) == (5, 5)


def test_mistral_runs_every_strategy(tmp_path):
    """Mistral (Llama-shaped, with a sliding window): the same equalities, cache == no cache."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(**LLAMA, sliding_window=256)).save_pretrained(tmp_path)
    joint, mot = make(tmp_path, "joint_decoder"), make(tmp_path, "mot")
    joint.adapter.load_state_dict(mot.adapter.state_dict())
    batch = mot.collate(samples())
    assert rel_err(mot(batch).logits, joint(batch).logits) <= 1e-5
    xattn = make(tmp_path, {"name": "cross_attention", "gate_init": 0.5})
    for vlm in (joint, mot, xattn):
        images = [img(2, 4, 5), img(2, 2, 6)]
        cached = vlm.generate_ids(images, "<image> and <image>?", max_new_tokens=5)
        assert cached == vlm.generate_ids(images, "<image> and <image>?", max_new_tokens=5, use_cache=False)
    with pytest.raises(ValueError, match="exceeds the LM's sliding window 256"):
        joint(joint.collate([{"images": [img(16, 16, 1)], "text": "x"}]))

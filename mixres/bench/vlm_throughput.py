"""VLM training throughput: the packed batch vs the same samples padded the usual way.

Both paths run the same modules with the same weights, forward + backward of the
next-token loss:

    packed  mixres.vlm: images as PackedImages (no padding), adapter on packed tokens, all
            samples in one LM sequence with varlen causal attention
    padded  images zero-padded to the largest one and encoded as one dense batch, the
            adapter over every padded token, each image's real tokens spliced into its
            sample, samples padded to the longest with a (causal & key-padding) mask
            and dense SDPA in every LM layer

With an HF causal LM (`--lm hf-llama`: a random Llama of the built-in decoder's shape) the
padded samples run as equal rows of the longest sample's length, right-padded, causal:
the real positions never see the padding and every row costs the longest sample.

With an HF encoder the padded batch runs without masks, as most pipelines do, so its
loss differs slightly (padding changes ViT features; see benchmarks/invariance.py).
Tokens/s counts the real LM positions (the same for both), so the ratio is the time ratio.
The two are timed interleaved, round by round; the best and the median round are reported.
The workload: B samples with 1-3 images each, grids of `mixed-N` scaled to
[--min-image-tokens, --max-image-tokens] patches, and 16-128 text bytes per sample.

    python -m mixres.bench.vlm_throughput                      # CPU, random-stub encoder
    python -m mixres.bench.vlm_throughput --encoder tiny-vit   # a real HF ViT (packed backend)
    mixres bench vlm --lm hf-llama --strategy mot              # an HF Llama, image experts
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mixres.bench.report import command_line, env_info, write_json
from mixres.packing import PackedFeatures, PackedImages
from mixres.vlm import IGNORE, SeqContext, build_vlm
from mixres.workloads import mixed_grids


def make_samples(n: int, seed: int, patch: int, lo: int, hi: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    grids = iter(mixed_grids(3 * n, seed, min_image_tokens=lo, max_image_tokens=hi))
    out = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (), generator=g))
        sizes = [next(grids) for _ in range(k)]
        images = [torch.randn(3, h * patch, w * patch, generator=g) for h, w in sizes]
        n_chars = int(torch.randint(16, 129, (), generator=g))
        text = "".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n_chars,), generator=g))
        out.append({"images": images, "text": text})
    return out


# the padded baseline

class PaddedContext(SeqContext):
    """B rows of Lmax positions flattened to (B*Lmax, ...); dense SDPA with a mask."""

    def __init__(self, mask: torch.Tensor, positions: torch.Tensor):
        b, L = mask.shape
        super().__init__(cu_q=None, max_q=L, positions=positions)
        causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
        self.rows, self.attn_mask = b, (causal[None] & mask[:, None, :])[:, None]  # (B, 1, L, L)

    def attend(self, q, k, v, slot):
        b, L = self.rows, self.max_q
        q, k, v = (t.reshape(b, L, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return o.transpose(1, 2).reshape(b * L, o.shape[1], o.shape[3])

    def cross_attend(self, q, k, v):
        """Cross-attention the padded way: each sample's image tokens padded to the longest
        (memory_mask), every text row of the sample reading them (samples have >= 1 image)."""
        b, L = self.rows, self.max_q
        m = self.memory_mask.shape[1]
        kd = k.new_zeros(b * m, k.shape[1], k.shape[2])
        vd = v.new_zeros(b * m, v.shape[1], v.shape[2])
        kd[self.memory_index], vd[self.memory_index] = k, v
        q = q.reshape(b, L, q.shape[1], q.shape[2]).transpose(1, 2)
        kd, vd = (t.reshape(b, m, t.shape[1], t.shape[2]).transpose(1, 2) for t in (kd, vd))
        o = F.scaled_dot_product_attention(q, kd, vd, attn_mask=self.memory_mask[:, None, None, :],
                                           enable_gqa=q.shape[1] != kd.shape[1])
        return o.transpose(1, 2).reshape(b * L, o.shape[1], o.shape[3])


def padded_image_tokens(vlm, images: PackedImages) -> torch.Tensor:
    """Every image padded to the largest grid, encoded and adapted densely; then each image's
    real tokens (prefix + its top-left grid region) are read back, in image order."""
    p, grids = images.patch_size, images.grid_hw
    hmax, wmax = (int(v) for v in grids.max(0).values)
    enc = vlm.encoder
    dtype = next(enc.parameters()).dtype
    pix = torch.zeros(grids.shape[0], images.channels, hmax * p, wmax * p, device=images.patches.device,
                      dtype=dtype)
    for i, im in enumerate(images.unpack()):
        pix[i, :, :im.shape[1], :im.shape[2]] = im
    if hasattr(enc, "runner"):  # an HF model: the usual dense call on the padded batch
        hidden = enc.model(pixel_values=pix, interpolate_pos_encoding=True).last_hidden_state
        prefix = enc.num_prefix
    else:  # the random stub: every image at the padded size
        dense = PackedImages.from_images(list(pix), p)
        feats = enc(dense)
        hidden, prefix = feats.tokens.reshape(grids.shape[0], -1, feats.tokens.shape[1]), feats.num_prefix
    b, n, d = hidden.shape
    dev = hidden.device
    feats = PackedFeatures(hidden.reshape(b * n, d), torch.arange(b + 1, dtype=torch.int32, device=dev) * n,
                           torch.tensor([[hmax, wmax]] * b), prefix)
    out = vlm.adapter(feats)  # the adapter runs over the padding too
    m = vlm.adapter.grid_multiple
    gh, gw, keep = hmax // m, wmax // m, out.num_prefix
    per = out.tokens.reshape(b, -1, out.tokens.shape[1])
    real = []
    for i, (h, w) in enumerate((grids // m).tolist()):
        grid = per[i, keep:].reshape(gh, gw, -1)[:h, :w].reshape(h * w, -1)
        real.append(torch.cat([per[i, :keep], grid]))
    return torch.cat(real)


def _is_hf(lm) -> bool:
    return type(lm).__name__ == "HFCausalLM"


def hf_llama(hidden: int, layers: int):
    """A random HF Llama of the built-in decoder's shape (8 heads, 4 KV heads, SwiGLU 8/3 x)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=260, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
            bos_token_id=257, eos_token_id=258, pad_token_id=256))


def padded_loss(vlm, batch) -> torch.Tensor:
    """The same loss as `vlm(batch).loss`, computed on padded tensors (any of the strategies)."""
    batch = batch.to(vlm.device)
    img = padded_image_tokens(vlm, batch.images)
    x = vlm.strategy.embed(vlm.lm, batch, img)
    dev = x.device
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    b, L = len(lens), max(lens)
    mask = torch.arange(L, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]
    dense = x.new_zeros(b * L, x.shape[1])
    flat = mask.reshape(-1).nonzero().squeeze(1)
    dense[flat] = x
    labels = torch.full((b * L,), IGNORE, dtype=torch.long, device=dev)
    labels[flat] = batch.labels
    pos = torch.arange(L, device=dev).repeat(b)
    if _is_hf(vlm.lm):  # the HF layers take offsets: equal rows of L, causal (right padding unseen)
        ctx = SeqContext(cu_q=torch.arange(b + 1, dtype=torch.int32, device=dev) * L, max_q=L, positions=pos)
    else:
        ctx = PaddedContext(mask, pos)
    mod = torch.zeros(b * L, dtype=torch.long, device=dev)
    mod[flat] = batch.modality_ids
    ctx.modality_ids = mod
    if not vlm.strategy.expands_images:  # cross-attention: the image tokens are the memory
        cu = batch.image_token_cu.to(dev).long()
        counts = (cu[1:] - cu[:-1]).tolist()
        m = max(counts)
        ctx.memory_mask = torch.arange(m, device=dev)[None] < torch.tensor(counts, device=dev)[:, None]
        ctx.memory_index = ctx.memory_mask.reshape(-1).nonzero().squeeze(1)
        ctx.memory = img
    h = vlm.lm.run(dense, ctx).reshape(b, L, -1)
    logits = vlm.lm.head(h[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(b, L)[:, 1:].reshape(-1))


def timed(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, interleaved round by round so that load changes on a
    shared machine hit every method alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--encoder", default="random")
    ap.add_argument("--adapter", default="mlp2")
    ap.add_argument("--strategy", default="joint_decoder", choices=["joint_decoder", "mot"])
    ap.add_argument("--lm", default="builtin", choices=["builtin", "hf-llama"],
                    help="the built-in decoder, or a random HF Llama of its shape")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--min-image-tokens", type=int, default=16)
    ap.add_argument("--max-image-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    enc = ({"name": "random", "hidden": args.hidden, "patch_size": 16, "num_prefix": 1}
           if args.encoder == "random" else args.encoder)
    vlm = build_vlm({"encoder": enc, "adapter": args.adapter, "strategy": args.strategy,
                     "lm": (hf_llama(args.hidden, args.layers) if args.lm == "hf-llama" else
                            {"hidden": args.hidden, "layers": args.layers, "heads": 8, "kv_heads": 4}),
                     "max_seq_tokens": 4096, "max_image_tokens": args.max_image_tokens}).train()
    # grids in units of the adapter's merge (token bounds stay in encoder patches)
    m = vlm.adapter.grid_multiple
    batch = vlm.collate(make_samples(args.samples, args.seed, vlm.encoder.patch_size * m,
                                     max(1, args.min_image_tokens // m ** 2),
                                     args.max_image_tokens // m ** 2))

    def packed():
        vlm.zero_grad(set_to_none=True)
        vlm(batch).loss.backward()

    def padded():
        vlm.zero_grad(set_to_none=True)
        padded_loss(vlm, batch).backward()

    # both paths compute the same loss (up to fp32 rounding): the baseline is the same model
    with torch.no_grad():
        lp, ld = float(vlm(batch).loss), float(padded_loss(vlm, batch))
    times = timed({"packed": packed, "padded": padded}, args.rounds)
    t_packed, t_padded = min(times["packed"]), min(times["padded"])
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lens = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1])
    grids = batch.images.grid_hw
    res = {
        "command": command_line() if argv is None else "mixres bench vlm " + " ".join(argv),
        "env": env_info(),
        "lm": args.lm, "strategy": args.strategy, "encoder": args.encoder,
        "samples": args.samples, "images": int(grids.shape[0]), "lm_positions": batch.num_tokens,
        "lm_positions_padded": int(lens.max()) * args.samples,
        "image_patches": int(grids.prod(-1).sum()),
        "image_patches_padded": int(grids.max(0).values.prod()) * int(grids.shape[0]),
        "loss_packed": lp, "loss_padded": ld,
        "packed_s": t_packed, "padded_s": t_padded,
        "packed_tokens_per_s": batch.num_tokens / t_packed,
        "padded_tokens_per_s": batch.num_tokens / t_padded,
        "speedup": t_padded / t_packed,
        "speedup_median": med["padded"] / med["packed"],
        "times": times,
    }
    for k, v in res.items():
        if k not in ("env", "times"):
            print(f"{k:>22}: {v:.4g}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.out:
        write_json(res, args.out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""HF SigLIP2's own way to run mixed sizes (NaFlex), as a `mixres bench throughput` method.

HF's Siglip2 image processor cuts each image into channel-last patches and pads every
image's patch sequence to one length with a `pixel_attention_mask`; `spatial_shapes` gives
each image's own grid, so positions are resized per image. Here the sequences are padded to
the longest image of each batch (not to the processor's fixed `max_num_patches`, which
would pad more), at most `MAX_TOKENS_PER_BATCH` padded tokens per batch, longest first so
similar lengths share a batch. Same images and weights as mixres' packed run; the patch
cutting and padding are timed, as mixres' own packing is.
"""

from __future__ import annotations

import torch

__all__ = ["MAX_TOKENS_PER_BATCH", "run_hf_naflex"]

MAX_TOKENS_PER_BATCH = 4096


def run_hf_naflex(model, images, **_):
    from mixres import vision_utils
    from mixres.families.siglip2 import naflex_patches

    tower = vision_utils.vision_tower(model)
    if vision_utils.family(model) != "siglip2":
        raise TypeError(f"hf-naflex: HF's NaFlex forward is SigLIP2's; got family "
                        f"{vision_utils.family(model)!r}")
    p = vision_utils.patch_size(model)
    order = sorted(range(len(images)), key=lambda i: -images[i].shape[1] * images[i].shape[2])
    start = 0
    while start < len(order):
        longest = images[order[start]].shape[1] * images[order[start]].shape[2] // p ** 2
        per = max(1, MAX_TOKENS_PER_BATCH // longest)
        batch = [images[i] for i in order[start:start + per]]
        start += per
        patches = images[0].new_zeros(len(batch), longest, p * p * images[0].shape[0])
        mask = torch.zeros(len(batch), longest, dtype=torch.long, device=patches.device)
        shapes = torch.tensor([[x.shape[1] // p, x.shape[2] // p] for x in batch], device=patches.device)
        for j, x in enumerate(batch):
            one = naflex_patches(x[None], p)[0]
            patches[j, :one.shape[0]] = one
            mask[j, :one.shape[0]] = 1
        tower(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)

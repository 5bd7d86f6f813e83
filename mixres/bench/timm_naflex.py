"""timm NaFlexViT's own way to run mixed sizes, as a `mixres bench throughput` method.

timm's NaFlex data pipeline patchifies each image (`timm.data.naflex_transforms.patchify_image`),
puts it in the smallest of its sequence-length buckets that holds it (the loader's default
`train_seq_lens` 128, 256, 576, 784, 1024), collates each bucket padded to that length with a
`patch_valid` mask (`timm.data.naflex_dataset.NaFlexCollator`), at most `max_tokens_per_batch`
(its default 4096 * 4) padded tokens per batch, and calls the model on the dict: masked
attention over the padding. Same images and weights as mixres' packed run.

The patchify and collate steps (the data loader's work in timm, in its worker processes) run
once per image list, outside the timed region: what is timed is the padded forwards only,
while mixres' packed time includes its own packing. That favours timm.
"""

from __future__ import annotations

__all__ = ["SEQ_LENS", "MAX_TOKENS_PER_BATCH", "naflex_batches", "run_timm_naflex"]

SEQ_LENS = (128, 256, 576, 784, 1024)  # timm create_naflex_loader's train_seq_lens
MAX_TOKENS_PER_BATCH = 4096 * 4        # timm NaFlexMapDatasetWrapper's max_tokens_per_batch


def _bucket(n: int) -> int:
    for s in SEQ_LENS:
        if n <= s:
            return s
    raise ValueError(f"an image of {n} patches is longer than timm's largest NaFlex bucket {SEQ_LENS[-1]}")


def naflex_batches(model, images) -> list[dict]:
    """timm's NaFlex input dicts for `images` (list of (C, H, W)): per bucket, padded."""
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import patchify_image

    emb = model.embeds
    buckets: dict[int, list] = {}
    for img in images:
        patches, coord, valid = patchify_image(img, tuple(emb.patch_size), channels_last=emb.channels_last)
        item = {"patches": patches, "patch_coord": coord, "patch_valid": valid}
        buckets.setdefault(_bucket(patches.shape[0]), []).append(item)
    batches = []
    for seq_len, items in sorted(buckets.items()):
        per = max(1, MAX_TOKENS_PER_BATCH // seq_len)
        collate = NaFlexCollator(max_seq_len=seq_len)
        for s in range(0, len(items), per):
            batch, _ = collate([(item, 0) for item in items[s:s + per]])
            batch.pop("seq_len")
            batches.append(batch)
    return batches


_PREPARED: dict[int, tuple[list, list[dict]]] = {}


def run_timm_naflex(model, images, **_):
    """timm's padded-bucket forwards over `images` (batches prepared once per image list)."""
    from mixres import vision_utils

    tower = vision_utils.vision_tower(model)
    if type(tower).__name__ != "NaFlexVit":
        raise TypeError("method timm-naflex needs a timm NaFlexVit model")
    key = id(images)
    if key not in _PREPARED or _PREPARED[key][0] is not images:
        p = next(tower.parameters())
        batches = [{k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype) for k, v in b.items()}
                   for b in naflex_batches(tower, [img.float().cpu() for img in images])]
        _PREPARED.clear()
        _PREPARED[key] = (images, batches)
    for batch in _PREPARED[key][1]:
        tower(batch)

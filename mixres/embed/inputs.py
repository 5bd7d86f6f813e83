"""The input side of `mixres embed`: loading a source's items in DataLoader workers.

Which items, in which order, and how their bytes are read is the source's business
(`mixres.embed.sources`). The work is cut into shards of `shard_size` consecutive items;
`SliceDataset` yields a few items of one shard at a time, decoded and preprocessed, so
the DataLoader's workers prepare the next shards while the device encodes the current
one. Bad items never raise in a worker: they come back as (position, key, reason) so the
main process decides between skip and fail.
"""

from __future__ import annotations

import hashlib

import torch

from mixres.embed.sources import IMAGE_EXTENSIONS, Source, collect_inputs
from mixres.packing import patchify
from mixres.preprocess import Preprocessor

__all__ = ["IMAGE_EXTENSIONS", "collect_inputs", "decode_one", "load_one", "SliceDataset",
           "plan_slices", "join_slices"]


# loading

def load_one(path: str, prep: Preprocessor) -> tuple[torch.Tensor, str]:
    """(normalized (3, H, W) tensor, sha256 of the file). Raises ValueError(reason)."""
    from mixres.embed.sources.files import read_path

    return decode_one(read_path(path), prep)


def decode_one(data: bytes, prep: Preprocessor) -> tuple[torch.Tensor, str]:
    """(normalized (3, H, W) tensor, sha256 of the encoded bytes). Raises ValueError(reason)."""
    from mixres.images import ImageLoadError

    digest = hashlib.sha256(data).hexdigest()
    try:
        img = prep(data).cpu()  # cuda decodes on the GPU
    except ImageLoadError as e:
        raise ValueError(e.reason) from None
    except Exception as e:  # a decoder bug on a weird file is that file's problem, not the run's
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from None
    return img, digest


class SliceDataset(torch.utils.data.Dataset):
    """Item i = `slices[i]` = (shard, lo, hi): items [lo, hi) of one shard, decoded.

    Slices are small (a few images) so that all workers share even a single shard, and the
    main process reassembles them into shards in order. An item is a dict: shard, items
    [(pos, key, sha256, metadata)], errors [(pos, key, reason)], patches (N, 3*p*p) of the
    good images in input order, grid_hw (B, 2).
    """

    def __init__(self, source: Source, slices: list[tuple[int, int, int]], prep: Preprocessor):
        self.source, self.slices, self.prep = source, slices, prep

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        s, lo, hi = self.slices[i]
        items, errors, patches, grids = [], [], [], []
        p = self.prep.patch_size
        for pos in range(lo, hi):
            key = self.source.keys[pos]
            try:
                data, meta = self.source.read(pos)
                img, digest = decode_one(data, self.prep)
            except ValueError as e:
                errors.append((pos, key, str(e)))
                continue
            items.append((pos, key, digest, meta))
            patches.append(patchify(img, p))
            grids.append((img.shape[1] // p, img.shape[2] // p))
        return {"shard": s, "items": items, "errors": errors,
                "patches": torch.cat(patches) if patches else torch.zeros(0, 3 * p * p),
                "grid_hw": torch.tensor(grids, dtype=torch.long).reshape(-1, 2)}


def plan_slices(shards: list[int], num_inputs: int, shard_size: int,
                per_slice: int) -> list[tuple[int, int, int]]:
    """(shard, lo, hi) slices of at most `per_slice` inputs, never crossing a shard boundary."""
    out = []
    for s in shards:
        end = min((s + 1) * shard_size, num_inputs)
        out += [(s, lo, min(lo + per_slice, end)) for lo in range(s * shard_size, end, per_slice)]
    return out


def join_slices(parts: list[dict]) -> dict:
    """The slices of one shard (in order) -> one item of the same form."""
    if len(parts) == 1:
        return parts[0]
    return {"shard": parts[0]["shard"], "items": [x for p in parts for x in p["items"]],
            "errors": [x for p in parts for x in p["errors"]],
            "patches": torch.cat([p["patches"] for p in parts]),
            "grid_hw": torch.cat([p["grid_hw"] for p in parts])}

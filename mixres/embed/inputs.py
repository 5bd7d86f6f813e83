"""The input side of `mixres embed`: which files to embed, and loading them in DataLoader workers.

`collect_inputs` turns INPUT (a folder, a text file of paths, a JSONL with a `path`
field, or a Python list) into a list of absolute paths in a fixed order. The work is cut
into shards of `shard_size` consecutive inputs; `ShardDataset` yields one whole shard
per item, decoded and preprocessed, so the DataLoader's workers prepare the next shards
while the device encodes the current one. Bad inputs never raise in a worker: they come
back as (position, path, reason) so the main process decides between skip and fail.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mixres.packing import patchify

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jfif", ".ico", ".tga"})


# which inputs

def _from_folder(root: Path) -> list[str]:
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return [os.path.abspath(p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix())]


def _resolve(entry: str, base: Path) -> str:
    # relative entries are relative to the list file, so the list can travel with the images
    p = Path(entry).expanduser()
    return os.path.abspath(p if p.is_absolute() else base / p)


def _from_jsonl(path: Path, lines: list[str]) -> list[str]:
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string 'path' field, got {line[:80]!r}")
        out.append(_resolve(row["path"], path.parent))
    return out


def collect_inputs(source, limit: int | None = None) -> list[str]:
    """INPUT -> absolute paths, in order, duplicates dropped (first kept).

    source  a folder (recursive; files with an image extension, sorted by relative path),
            a .jsonl file (or any file whose first line is a JSON object) with a `path`
            field per line, a text file with one path per line (blank lines and lines
            starting with # are skipped), or a list of paths
    """
    if isinstance(source, (list, tuple)):
        paths = [os.path.abspath(os.fspath(p)) for p in source]
    else:
        src = Path(source).expanduser()
        if src.is_dir():
            paths = _from_folder(src)
            if not paths:
                raise ValueError(f"INPUT {source}: no image files in this folder or below "
                                 f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        elif src.is_file():
            lines = src.read_text().splitlines()
            first = next((x for x in lines if x.strip()), "")
            if src.suffix.lower() == ".jsonl" or first.lstrip().startswith("{"):
                paths = _from_jsonl(src, lines)
            else:
                paths = [_resolve(x.strip(), src.parent) for x in lines
                         if x.strip() and not x.lstrip().startswith("#")]
        else:
            raise FileNotFoundError(f"INPUT {source}: no such folder or file (expected a folder of "
                                    "images, a text file of paths or a JSONL with a 'path' field)")
    paths = list(dict.fromkeys(paths))
    if limit is not None:
        if limit < 0:
            raise ValueError(f"--limit must be >= 0, got {limit}")
        paths = paths[:limit]
    return paths


# loading

@dataclass(frozen=True)
class Prep:
    """How a worker turns a file into a (3, H, W) tensor (everything picklable)."""

    patch_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_image_tokens: int
    max_image_tokens: int | None
    max_pixels: int | None
    decode: str = "pil"  # [decode hook] a mixres.decode.DECODERS name


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a directory, not an image file") from None
    except PermissionError:
        raise ValueError("unreadable path (permission denied)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable path ({getattr(e, 'strerror', None) or e})") from None


def load_one(path: str, prep: Prep) -> tuple[torch.Tensor, str]:
    """(normalized (3, H, W) tensor, sha256 of the file). Raises ValueError(reason)."""
    from mixres.decode import get_decoder  # [decode hook] was mixres.images.preprocess
    from mixres.images import ImageLoadError

    data = _read(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = get_decoder(prep.decode).preprocess(
            data, prep.patch_size, min_image_tokens=prep.min_image_tokens,
            max_image_tokens=prep.max_image_tokens, mean=prep.mean, std=prep.std,
            max_pixels=prep.max_pixels).cpu()  # [decode hook] cuda decodes on the GPU
    except ImageLoadError as e:
        raise ValueError(e.reason) from None
    except Exception as e:  # a decoder bug on a weird file is that file's problem, not the run's
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from None
    return img, digest


class SliceDataset(torch.utils.data.Dataset):
    """Item i = `slices[i]` = (shard, lo, hi): inputs [lo, hi) of one shard, decoded.

    Slices are small (a few images) so that all workers share even a single shard, and the
    main process reassembles them into shards in order. An item is a dict: shard, items
    [(pos, path, sha256)], errors [(pos, path, reason)], patches (N, 3*p*p) of the good
    images in input order, grid_hw (B, 2).
    """

    def __init__(self, paths: list[str], slices: list[tuple[int, int, int]], prep: Prep):
        self.paths, self.slices, self.prep = paths, slices, prep

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        s, lo, hi = self.slices[i]
        items, errors, patches, grids = [], [], [], []
        p = self.prep.patch_size
        for pos in range(lo, hi):
            path = self.paths[pos]
            try:
                img, digest = load_one(path, self.prep)
            except ValueError as e:
                errors.append((pos, path, str(e)))
                continue
            items.append((pos, path, digest))
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

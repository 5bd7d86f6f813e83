"""The benchmark workloads (mixed-N, oracle, words, photos; benchmarks/README.md), generated
deterministically from a seed.

    mixed-N      N images, aspect ratio log-uniform in [0.5, 2], token count uniform in
                 [64, 1024] at patch 16 (h = round(sqrt(t / ar)), w = round(t / h)); other
                 ranges (`--tokens LO-HI`) scale it
    oracle       uniform square images with the same total token count (the dense limit):
                 224x224 at patch 16, or the workload's mean image size where that is smaller
    words-N      (throughput) N word-sized images, 1-64 tokens: words-BxL's sizes in whole patches
    words-BxL    B samples x L images like rendered words: heights 16-32 px, widths
                 16-512 px, as a zero-padded (B, L, 3, H, W) tensor with (B, L, 2) true
                 sizes; some slots empty (size 0)
    photos       real-looking RGB photographs written as JPEG/PNG files of varied size
                 and mode (for the CLI demo and the extraction tests)

Images are random normal "already normalized" tensors: the encoders' cost and the
invariance checks do not depend on what the pixels show.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def mixed_grids(n: int, seed: int = 0, min_image_tokens: int = 64, max_image_tokens: int = 1024,
                ar_range: tuple[float, float] = (0.5, 2.0)) -> list[tuple[int, int]]:
    """Patch grids (h, w) of the mixed-N workload."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(ar_range[0]), math.log(ar_range[1])
    grids = []
    for _ in range(n):
        ar = math.exp(lo + (hi - lo) * torch.rand((), generator=g).item())
        t = int(torch.randint(min_image_tokens, max_image_tokens + 1, (), generator=g))
        h = max(1, round(math.sqrt(t / ar)))
        w = max(1, round(t / h))
        grids.append((h, w))
    return grids


def word_grids(n: int, seed: int = 0, patch_size: int = 16, heights=(16, 32),
               widths=(16, 512)) -> list[tuple[int, int]]:
    """Patch grids of n word-like images (words-BxL's sizes, each side floored to whole
    patches, at least one): 1-2 rows x 1-32 columns at patch 16, 1-64 tokens."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randint(heights[0], heights[1] + 1, (n,), generator=g).tolist()
    ws = torch.randint(widths[0], widths[1] + 1, (n,), generator=g).tolist()
    return [(max(1, h // patch_size), max(1, w // patch_size)) for h, w in zip(hs, ws)]


def grid_images(grids, seed: int = 0, patch_size: int = 16, channels: int = 3) -> list[torch.Tensor]:
    """(C, h*p, w*p) random images of the given patch grids."""
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(channels, h * patch_size, w * patch_size, generator=g) for h, w in grids]


def mixed_images(n: int, seed: int = 0, patch_size: int = 16, min_image_tokens: int = 64,
                 max_image_tokens: int = 1024, channels: int = 3) -> list[torch.Tensor]:
    """The mixed-N workload as (C, H, W) float tensors (sizes scale with the patch size)."""
    return grid_images(mixed_grids(n, seed, min_image_tokens, max_image_tokens), seed, patch_size, channels)


def oracle_images(total_tokens: int, patch_size: int = 16, side: int = 224,
                  seed: int = 0) -> list[torch.Tensor]:
    """Uniform side x side images whose token count adds up to about `total_tokens`."""
    per = (side // patch_size) ** 2
    n = max(1, round(total_tokens / per))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, side, side, generator=g) for _ in range(n)]


def words_batch(b: int = 8, l: int = 32, seed: int = 0, heights=(16, 32), widths=(16, 512),
                empty_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """words-BxL: zero-padded (B, L, 3, Hmax, Wmax) images and (B, L, 2) true sizes."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randint(heights[0], heights[1] + 1, (b, l), generator=g)
    ws = torch.randint(widths[0], widths[1] + 1, (b, l), generator=g)
    empty = torch.rand(b, l, generator=g) < empty_fraction
    hs[empty], ws[empty] = 0, 0
    dims = torch.stack([hs, ws], -1)
    out = torch.zeros(b, l, 3, heights[1], widths[1])
    for i in range(b):
        for j in range(l):
            h, w = int(hs[i, j]), int(ws[i, j])
            if h and w:
                out[i, j, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return out, dims


def write_photos(folder: str | Path, n: int = 12, seed: int = 0,
                 sizes=((48, 640), (40, 480))) -> list[Path]:
    """Write `n` small synthetic photographs (JPEG, PNG, varied sizes and modes).

    Smooth gradients plus shapes and noise, so resizing and JPEG behave as on photos.
    Used by the README demo (`mixres embed` needs something to embed with no network).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h = int(rng.integers(sizes[1][0], sizes[1][1]))
        w = int(rng.integers(sizes[0][0], sizes[0][1]))
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(h + w - 2, 1)], -1)
        tint = rng.uniform(0.3, 1.0, 3)
        arr = (base * tint * 255 + rng.normal(0, 8, (h, w, 3))).clip(0, 255).astype("uint8")
        img = Image.fromarray(arr, "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(4, max(5, min(h, w) // 3)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
        kind = i % 4
        if kind == 0:
            p = folder / f"photo_{i:03d}.jpg"
            img.save(p, quality=90)
        elif kind == 1:
            p = folder / f"photo_{i:03d}.png"
            img.save(p)
        elif kind == 2:
            p = folder / f"photo_{i:03d}_gray.jpg"
            img.convert("L").save(p, quality=90)
        else:
            p = folder / f"photo_{i:03d}_alpha.png"
            rgba = img.convert("RGBA")
            rgba.putalpha(Image.fromarray((rng.uniform(0.5, 1, (h, w)) * 255).astype("uint8")))
            rgba.save(p)
        paths.append(p)
    return paths


def mixed_jpeg_sizes(n: int, seed: int = 0, sides: tuple[int, int] = (200, 1000),
                     ar_range: tuple[float, float] = (0.5, 2.0)) -> list[tuple[int, int]]:
    """(h, w) in pixels of the mixed-JPEG workload: aspect ratio log-uniform in `ar_range`
    (the mixed-N ratios), both sides within `sides`, the longer one uniform in what that allows."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(ar_range[0]), math.log(ar_range[1])
    out = []
    for _ in range(n):
        ar = math.exp(lo + (hi - lo) * torch.rand((), generator=g).item())  # w / h
        stretch = max(ar, 1 / ar)
        long_lo = min(sides[1], math.ceil(sides[0] * stretch))
        long = long_lo + int((sides[1] - long_lo + 1) * torch.rand((), generator=g).item())
        short = max(sides[0], round(long / stretch))
        out.append((short, long) if ar >= 1 else (long, short))
    return out


def write_mixed_jpegs(folder: str | Path, n: int = 32, seed: int = 0, sides=(200, 1000),
                      quality: int = 90) -> list[Path]:
    """Write the mixed-JPEG workload: `n` photo-like RGB JPEGs of `mixed_jpeg_sizes`.

    Content as in `write_photos` (gradients, shapes, sensor-like noise), so decode and
    resize cost what they cost on photographs of that size. Used by `mixres bench embed`.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(mixed_jpeg_sizes(n, seed, sides)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / (w - 1), yy / (h - 1), (xx + yy) / (h + w - 2)], -1)
        arr = (base * rng.uniform(0.3, 1.0, 3) * 255 + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
        img = Image.fromarray(arr.astype("uint8"), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(8):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            r = int(rng.integers(4, max(5, min(h, w) // 3)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
        p = folder / f"mixed_{i:04d}_{w}x{h}.jpg"
        img.save(p, quality=quality)
        paths.append(p)
    return paths

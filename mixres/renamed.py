"""Old argument names that still work, with a message saying the new one.

The per-image token cap and the batch token budget once both went by `max_tokens`;
they are now `max_image_tokens` (with `min_image_tokens`) and `max_batch_tokens`.
Old spellings are accepted where users typed them (Python keyword arguments, the
`mixres embed` flags, the training TOML's [data] table) and warn once per call site.
"""

from __future__ import annotations

import warnings

__all__ = ["IMAGE_TOKENS", "BATCH_TOKENS", "take_renamed"]

IMAGE_TOKENS = {"min_tokens": "min_image_tokens", "max_tokens": "max_image_tokens"}
BATCH_TOKENS = {"max_tokens": "max_batch_tokens", "eval_max_tokens": "eval_max_batch_tokens"}


def take_renamed(values: dict, renames: dict[str, str], where: str) -> dict:
    """`values` with old keys moved to their new names (a FutureWarning for each)."""
    out = dict(values)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"{where}: both {old!r} (the old name) and {new!r} given; keep {new!r}")
        warnings.warn(f"{where}: {old!r} is now called {new!r}", FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def resolve_renamed(old: dict, renames: dict[str, str], where: str, **current):
    """Values of `current` (the new names' arguments), overridden by old spellings in `old`.

    For functions that take `**old`: anything in `old` that is no old name is a TypeError,
    as Python would raise for an unknown keyword.
    """
    unknown = sorted(set(old) - set(renames))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {unknown}")
    moved = take_renamed(old, renames, where)
    return tuple(moved.get(name, value) for name, value in current.items())

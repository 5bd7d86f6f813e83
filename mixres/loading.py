"""`load_model`: a model from what a user names it by (module | preset | dir | hub id | timm | open_clip).

    mixres.load_model(model)              # an nn.Module, as it is
    mixres.load_model("tiny-vit")         # a preset (mixres.presets): seeded random weights
    mixres.load_model("path/to/saved")    # a save_pretrained folder
    mixres.load_model("org/name")         # a Hugging Face hub id
    mixres.load_model("timm:vit_small_patch16_224")   # timm / open_clip (mixres.timm_models)

A name that is none of these fails at once with one line: a typo of a preset says which
one was meant before anything asks the Hub, and an unreachable Hub is found by one TCP
connect instead of the hub client's retries.
"""

from __future__ import annotations

import json
import os

import transformers as tf
from torch import nn

from mixres.presets import PRESETS, UnknownModelError, build, did_you_mean, list_presets
from mixres.registry import Registry
from mixres.timm_models import is_library_spec, load_library_model

__all__ = ["load_model", "MODEL_TYPES", "UnknownModelError"]

# model types registered with AutoConfig by a mixres module, imported before from_pretrained
MODEL_TYPES = Registry("model type")
MODEL_TYPES.lazy("navit", "mixres.models.navit")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def load_model(spec, *, trust_remote_code: bool = False, model_kwargs: dict | None = None) -> nn.Module:
    """An nn.Module as it is; a preset name -> `build`; a local directory or a hub id ->
    `AutoModel.from_pretrained` (a whole CLIP/SigLIP stays whole: see vision_utils.vision_tower);
    `timm:<name>`, `hf-hub:timm/...`, `open_clip:<arch>[:<pretrained>]` -> timm / open_clip
    (`mixres.timm_models`; `model_kwargs` go to their factory).

    With HF_HUB_OFFLINE=1 a hub id is looked up in the local cache only, so a machine
    without network fails at once instead of after the hub client's retries.
    """
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str | os.PathLike):
        raise TypeError(f"load_model: expected an nn.Module, a preset name, a local directory "
                        f"or a hub id, got {type(spec).__name__}")
    name = os.fspath(spec)
    if is_library_spec(name):
        return load_library_model(name, **(model_kwargs or {}))
    if model_kwargs:
        raise ValueError(f"model_kwargs are for timm: / open_clip: models, not {name!r}")
    if name in PRESETS:
        return build(name)
    if os.path.isdir(name):
        model_type = _saved_model_type(name)
        if model_type in MODEL_TYPES:
            MODEL_TYPES.get(model_type)
        return tf.AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
    near = did_you_mean(name)
    if near and "/" not in name:
        # a typo of a preset: say so at once instead of asking the Hub about it first
        raise UnknownModelError(f"{name!r} is neither a mixres preset nor a local directory. Presets: "
                                f"{', '.join(list_presets())}.{near} (A hub id is spelled org/name.)")
    offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
    unreachable = None if offline else _hub_unreachable()
    if unreachable:
        offline = True  # the cache may still have it; the hub client would retry for many seconds
    try:
        return tf.AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code,
                                            local_files_only=offline)
    except OSError as err:  # huggingface_hub's not-found / no-connection / bad-id errors
        why = (f"the Hub is unreachable ({unreachable}) and it is not in the local cache" if unreachable
               else "HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        raise UnknownModelError(
            f"{name!r} is neither a mixres preset nor a local directory, and the Hugging Face "
            f"Hub could not provide it ({why}). Presets: {', '.join(list_presets())}."
            + did_you_mean(name)) from None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub's host cannot be reached (one TCP connect, at most `timeout` s), or None."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{url.hostname}:{port}: {e.strerror or type(e).__name__}"
    return None


def _saved_model_type(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError):
        return None

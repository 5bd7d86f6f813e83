"""The wire format: OpenAI's embeddings request and response, with mixres's extras.

Request  {"model": ..., "input": [image, ...], "encoding_format": "float" | "base64",
          "modality": "image", "pool": "model" | "cls" | "mean", "normalize": bool,
          "return_tokens": bool}
         each image is a data URI (data:image/png;base64,...) or bare base64 of the file's
         bytes. Never a URL and never a path: the server does not fetch or open anything a
         request names.
Response {"object": "list", "model": ..., "usage": {"prompt_tokens", "total_tokens"},
          "data": [{"object": "embedding", "index": i, "embedding": [...] | "<base64>",
                    + with return_tokens: "tokens", "grid": [h, w], "num_prefix"}]}
"base64" is OpenAI's: the little-endian float32 bytes of the vector (tokens: of the (n, D)
matrix, row-major).
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator

from mixres.serve.engine import Embedding, InputError

__all__ = ["EmbeddingRequest", "image_bytes", "embedding_response"]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: list[str]  # one string is a list of one (OpenAI's `input` takes both)
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    modality: Literal["image"] | None = None
    pool: Literal["model", "cls", "mean"] | None = None
    normalize: bool = False
    return_tokens: bool = False
    user: str | None = None  # OpenAI's field, accepted and unused

    @field_validator("input", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


def image_bytes(index: int, value: str) -> bytes:
    """One `input` entry -> the image file's bytes. Raises InputError naming the index."""
    head = value[:16].lower()
    if value.startswith("data:"):
        meta, sep, body = value.partition(",")
        if not sep or not meta.endswith(";base64"):
            raise InputError(index, "a data URI must be base64-encoded (data:image/png;base64,...)")
    elif "://" in head:
        raise InputError(index, "URLs are not fetched: send the image's bytes as a data URI or base64")
    else:
        body = value
    try:
        data = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(index, f"not a data URI or base64 of an image file ({e})") from None
    if not data:
        raise InputError(index, "empty image (0 bytes)")
    return data


def _encode(x, fmt: str):
    a = x.detach().cpu().numpy().astype("<f4", copy=False)
    if fmt == "base64":
        return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")
    return a.tolist()


def embedding_response(results: list[Embedding], model: str, fmt: str, return_tokens: bool) -> dict:
    data = []
    for i, r in enumerate(results):
        row = {"object": "embedding", "index": i,
               "embedding": None if r.pooled is None else _encode(r.pooled, fmt)}
        if return_tokens:
            row.update(tokens=_encode(r.tokens, fmt), grid=list(r.grid), num_prefix=r.num_prefix)
        data.append(row)
    tokens = sum(r.num_tokens for r in results)
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

"""The API key check, importable by any route on the app (`Depends(require_api_key)`).

The key lives on the app (`create_app(engine, api_key=...)` puts it in `app.state.api_key`),
so a router added with `extra_routers` is protected by the same key without knowing it.
"""

from __future__ import annotations

import secrets

from fastapi import Request

from mixres.serve.errors import ApiError

__all__ = ["require_api_key"]


async def require_api_key(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (no key set: all pass)."""
    key = getattr(request.app.state, "api_key", None)
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})

"""Every error the server answers: one status, one line, OpenAI's error shape.

    {"error": {"message": "input[2]: truncated image", "type": "invalid_request_error", "code": 400}}

`STATUS` maps each exception type to its answer; `install(app)` registers them, plus
FastAPI's validation errors, rewritten as one line naming the field.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from mixres.serve.engine import EngineError, InputError, Overloaded, TooLarge, Unavailable

__all__ = ["ApiError", "STATUS", "error_response", "install", "RETRY_AFTER_S"]

RETRY_AFTER_S = 1  # what a 503 asks a client to wait


class ApiError(Exception):
    """An answer with this status and one-line message (raised by routes and dependencies)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# exception type -> (status, OpenAI error type, extra headers)
STATUS: dict[type, tuple[int, str, dict | None]] = {
    InputError: (400, "invalid_request_error", None),
    TooLarge: (413, "invalid_request_error", None),
    Overloaded: (503, "server_overloaded", {"Retry-After": str(RETRY_AFTER_S)}),
    Unavailable: (503, "server_unavailable", {"Retry-After": str(RETRY_AFTER_S)}),
    EngineError: (500, "server_error", None),
    TimeoutError: (504, "timeout", None),
}

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 422: "invalid_request_error"}


def error_response(status: int, message: str, headers: dict | None = None,
                   type_: str | None = None) -> JSONResponse:
    line = " ".join(str(message).split())  # one line, whatever the reason held
    body = {"error": {"message": line, "type": type_ or _TYPES.get(status, "server_error"), "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _loc(loc) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return error_response(400, f"the request body is not valid JSON ({err.get('msg', '')})")
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    if err.get("type") == "missing":
        msg = "field required"
    return error_response(422, f"{_loc(err.get('loc', ()))}: {msg}")


def install(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    def handler(status: int, type_: str, headers: dict | None):
        async def handle(request: Request, exc: Exception) -> JSONResponse:
            msg = str(exc) or type(exc).__name__
            return error_response(status, msg, headers, type_)
        return handle

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    for exc_type, (status, type_, headers) in STATUS.items():
        app.add_exception_handler(exc_type, handler(status, type_, headers))

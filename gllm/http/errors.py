"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}``.

The OpenAI SDKs read the HTTP status to pick an exception class (400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 413/400 for sizes, 503 InternalServerError) and the body
for its message, so both must be right.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answered to the client: an HTTP status plus OpenAI's error object."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_type(status)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def default_type(status: int) -> str:
    # OpenAI answers every 4xx (401 and 404 included) with "invalid_request_error", 5xx with "server_error".
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, type="invalid_request_error", param=param, code=code)

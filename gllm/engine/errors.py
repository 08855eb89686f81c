"""Why the engine refused a request. All are ValueErrors, so a caller that only knows "bad input" still
works; each names the request field at fault (`field`, None when no one field is) and says what kind of
refusal it is (`code`), and front ends map those to their own errors, never the message text. A sampling
field out of range is a `gllm.request_fields.FieldError`, which carries `field` and `code` the same way."""

from __future__ import annotations


class RequestRejected(ValueError):
    code = "bad_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestTooLong(RequestRejected):
    """The prompt (plus the requested output) does not fit max_seq_len or the KV cache."""
    code = "too_long"


class EngineBusy(RequestRejected):
    """Too many requests in flight: retry later."""
    code = "busy"


class PinRefused(RequestRejected):
    """A pin that would leave running requests too few KV blocks (or a prefix that could not be cached)."""
    code = "too_long"

"""Why the engine refused a request. All are ValueErrors naming the field, so a caller that only
knows "bad input" still works; front ends map the subclasses to their own codes."""


class RequestRejected(ValueError):
    code = "bad_request"


class RequestTooLong(RequestRejected):
    """The prompt (plus the requested output) does not fit max_seq_len or the KV cache."""
    code = "too_long"


class EngineBusy(RequestRejected):
    """Too many requests in flight: retry later."""
    code = "busy"

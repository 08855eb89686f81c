"""`StopChecker`: ends a request on a stop token, a stop string or its length limit.

Stop strings are matched on the decoded text. Text that might be the start of a stop string
is held back from streaming until it is known not to be one, so a stop string never leaks
into what the client sees.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopResult:
    finished: bool
    finish_reason: str | None = None   # "stop" or "length"
    keep_text: bool = False            # the finishing token's text belongs to the output (a grammar's last token)


class StopChecker:
    def __init__(self, stop_token_ids: set[int], stop_strings: tuple[str, ...], max_new_tokens: int) -> None:
        self.stop_token_ids = stop_token_ids
        self.stop_strings = stop_strings
        self.max_new_tokens = max_new_tokens
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1

    def check_token(self, token_id: int, num_output_tokens: int) -> StopResult:
        if token_id in self.stop_token_ids:
            return StopResult(True, "stop")
        if num_output_tokens >= self.max_new_tokens:
            return StopResult(True, "length")
        return StopResult(False)

    def find_stop_string(self, text: str, new_chars: int) -> int | None:
        """Index where the earliest stop string starts, looking only where `new_chars` could complete one."""
        if not self.stop_strings:
            return None
        window_start = max(0, len(text) - new_chars - self.holdback)
        hits = [i for s in self.stop_strings if (i := text.find(s, window_start)) != -1]
        return min(hits) if hits else None

    def safe_length(self, text: str) -> int:
        """How much of `text` may be streamed: all but a tail that could still begin a stop string."""
        if not self.stop_strings:
            return len(text)
        for cut in range(max(0, len(text) - self.holdback), len(text)):
            tail = text[cut:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return cut
        return len(text)

"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # in (0, 1]
    min_p: float = 0.0                # in [0, 1]
    repetition_penalty: float = 1.0   # HF style, over prompt and output; 1 = off
    presence_penalty: float = 0.0     # OpenAI style, over the output; in [-2, 2]
    frequency_penalty: float = 0.0    # OpenAI style, over the output; in [-2, 2]
    seed: int | None = None           # None: the engine draws one
    logprobs: int | None = None       # None: off; N: chosen token plus the top N (0..20)
    stop: tuple[str, ...] = ()        # stop strings, excluded from the returned text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logits_processor: object | None = field(default=None, compare=False)  # seam: (token_ids, logits) -> logits

    def __post_init__(self) -> None:
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
               "max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        _check(_finite(self.temperature) and self.temperature >= 0,
               "temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               "top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        _check(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", f"must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        _check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**64),
               "seed", f"must be an integer in [0, 2**64), got {self.seed!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
               "logprobs", f"must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"takes at most {MAX_STOP_STRINGS} strings")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS, "stop",
                   f"entries must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{field_name} {message}")

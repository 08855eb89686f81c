"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from gllm.request_fields import SAMPLING_FIELDS, check_one_constraint


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
    # Structured output: at most one (see gllm.sampling.grammar). json_schema is kept as compact JSON text.
    json_schema: str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: tuple[str, ...] = ()
    logits_processor: object | None = field(default=None, compare=False)  # seam: (token_ids, logits) -> logits

    def __post_init__(self) -> None:
        # Every bound comes from the one request field table (the engine's, the bridge's and HTTP's alike).
        for f in SAMPLING_FIELDS:
            value = f.check(getattr(self, f.name))
            if isinstance(value, (tuple, str)):   # lists become tuples, a schema object its JSON text
                object.__setattr__(self, f.name, value)
        check_one_constraint({f.name: getattr(self, f.name) for f in SAMPLING_FIELDS})

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(field, source) of the request's output constraint, or None: what the grammar engine compiles."""
        if self.json_schema is not None:
            return "json_schema", self.json_schema
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        if self.choice:
            return "choice", json.dumps(list(self.choice), ensure_ascii=False)
        return None

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


"""The request field table: every per-request generation field once, with its type, default, range,
wire name and help. `SamplingParams` and `GenerationRequest` validate through it; the bridge's
`generate`, the OpenAI mapping and the CLI flags are derived from it, so one bound holds everywhere.

Adding a request field is one `RequestField` entry here plus its use. This module imports nothing of
gllm: every layer may read it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
UINT64_MAX = 2**64 - 1


class FieldError(ValueError):
    """A request field with a wrong type or a value out of its range. `field` is the name the caller used
    (the wire name on the bridge and over HTTP, the Python name in the API); `code` is "wrong_type",
    "out_of_range" or "conflict" (two fields that exclude each other), and "invalid" for a constraint
    (schema, regex, grammar) the grammar engine cannot compile."""

    def __init__(self, field: str, code: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.code = code


@dataclass(frozen=True)
class RequestField:
    name: str                     # the Python name (GenerationRequest, SamplingParams)
    kind: str                     # "int", "float", "bool", "str_list", "int_list", "str" or "json"
    default: Any
    help: str
    lo: float | None = None       # numbers: the range; lists: each item's range (int) or length (str)
    hi: float | None = None
    lo_open: bool = False
    nullable: bool = False        # None is a value of its own (seed: random; logprobs: off)
    max_items: int | None = None  # lists
    wire: str | None = None       # the bridge's and OpenAI's name, when it differs from `name`
    on_bridge: bool = True        # a field of the bridge's `generate`
    on_http: bool = True          # read by the OpenAI mapping under `wire_name`
    scheduling: bool = False      # read by the scheduler (when and how fast), not by the sampler
    constraint: bool = False      # constrains the output's form (structured output): at most one per request
    engine: bool = False          # read by the engine around the request (result cache, pins), not by the sampler

    @property
    def wire_name(self) -> str:
        return self.wire or self.name

    @property
    def limits(self) -> str:
        """The range in words, as the docs and error messages state it."""
        if self.kind in ("int", "float"):
            lo = "" if self.lo is None else f"{'(' if self.lo_open else '['}{_num(self.lo)}, "
            return f"{lo}{_num(self.hi)}]" if self.lo is not None else f"<= {_num(self.hi)}"
        if self.kind == "str_list":
            return f"at most {self.max_items} strings of {_num(self.lo)} to {_num(self.hi)} characters"
        if self.kind == "int_list":
            return f"at most {self.max_items} integers in [{_num(self.lo)}, {_num(self.hi)}]"
        if self.kind == "str":
            return f"a string of {_num(self.lo)} to {_num(self.hi)} characters"
        if self.kind == "json":
            return (f"a JSON object (a map), or its JSON text: {_num(self.lo)} to {_num(self.hi)} characters "
                    "as compact JSON")
        return "true or false"

    def check(self, value: Any, name: str | None = None) -> Any:
        """`value` if it is valid (lists as tuples), else `FieldError` naming `name` (default: `self.name`)."""
        name = name or self.name
        if value is None and self.nullable:
            return None
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise FieldError(name, "wrong_type", f"must be true or false, got {_show(value)}")
            return value
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(name, "wrong_type", f"must be an integer, got {_show(value)}")
            if not self.lo <= value <= self.hi:
                raise FieldError(name, "out_of_range", f"must be in {self.limits}, got {value}")
            return value
        if self.kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FieldError(name, "wrong_type", f"must be a number, got {_show(value)}")
            number = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
            if not (math.isfinite(number) and (self.lo < number if self.lo_open else self.lo <= number)
                    and number <= self.hi):
                raise FieldError(name, "out_of_range", f"must be a finite number in {self.limits}, got {value!r}")
            return value
        if self.kind == "str":
            if not isinstance(value, str):
                raise FieldError(name, "wrong_type", f"must be a string, got {_show(value)}")
            if not self.lo <= len(value) <= self.hi:
                raise FieldError(name, "out_of_range", f"must be {self.limits}, got {len(value)}")
            return value
        if self.kind == "json":
            return self._check_json(value, name)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise FieldError(name, "wrong_type", f"must be a list, got {_show(value)}")
        if len(value) > self.max_items:
            raise FieldError(name, "out_of_range", f"takes {self.limits}, got {len(value)}")
        for item in value:
            if self.kind == "str_list":
                ok = isinstance(item, str) and self.lo <= len(item) <= self.hi
            else:
                ok = isinstance(item, int) and not isinstance(item, bool) and self.lo <= item <= self.hi
            if not ok:
                raise FieldError(name, "out_of_range" if isinstance(item, (str, int)) else "wrong_type",
                                 f"takes {self.limits}, got an entry {_show(item)}")
        return tuple(value)


    def _check_json(self, value: Any, name: str) -> str:
        """A JSON object given as itself or as JSON text, returned as compact JSON text (its key order kept:
        a schema's property order is the order the output writes them in)."""
        if isinstance(value, str):
            if len(value) > self.hi:
                raise FieldError(name, "out_of_range", f"must be {self.limits}, got {len(value)} characters")
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as exc:
                raise FieldError(name, "wrong_type", f"must be a JSON object; its text does not parse: {exc}") from None
        if not isinstance(value, dict):
            raise FieldError(name, "wrong_type", f"must be a JSON object, got {_show(value)}")
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise FieldError(name, "wrong_type", f"must hold JSON values only: {exc}") from None
        if not self.lo <= len(text) <= self.hi:
            raise FieldError(name, "out_of_range", f"must be {self.limits}, got {len(text)} characters")
        return text


def check_one_constraint(values: dict[str, Any]) -> None:
    """`FieldError` naming the second constraint field set (json_schema, regex, grammar, choice): a request
    takes at most one."""
    given = [f.name for f in CONSTRAINT_FIELDS if values.get(f.name) not in (None, (), [])]
    if len(given) > 1:
        raise FieldError(given[1], "conflict", f"cannot be combined with {given[0]}: give at most one of "
                         + ", ".join(f.name for f in CONSTRAINT_FIELDS))


def _num(x: float | None) -> str:
    if x == INT32_MAX:
        return "2**31-1"
    if x == INT32_MIN:
        return "-2**31"
    if x == UINT64_MAX:
        return "2**64-1"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


# In the bridge's documented key order (PROTOCOL.md's test vectors encode it).
REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField("max_new_tokens", "int", 256, "most tokens to generate (also capped by max_seq_len)",
                 1, INT32_MAX, wire="max_tokens"),
    RequestField("temperature", "float", 1.0, "0 = greedy; higher flattens the distribution (above 2 with min_p)",
                 0.0, 5.0),
    RequestField("top_k", "int", 0, "sample among the k most likely tokens; 0 = off", 0, INT32_MAX),
    RequestField("top_p", "float", 1.0, "sample among the smallest head holding this much probability",
                 0.0, 1.0, lo_open=True),
    RequestField("min_p", "float", 0.0, "drop tokens below min_p x the top token's probability", 0.0, 1.0),
    RequestField("seed", "int", None, "same seed + same request = same output; none: random",
                 0, UINT64_MAX, nullable=True),
    RequestField("stop", "str_list", (), "strings that end the output (cut from it)", 1, 256, max_items=16),
    RequestField("logprobs", "int", None, "return each token's log-probability and the top N; none: off",
                 0, 20, nullable=True, on_http=False),
    RequestField("priority", "int", 0, "higher is scheduled first and preempted last", INT32_MIN, INT32_MAX,
                 scheduling=True),
    RequestField("repetition_penalty", "float", 1.0, "HF style, over prompt and output; 1 = off",
                 0.0, 100.0, lo_open=True),
    RequestField("presence_penalty", "float", 0.0, "OpenAI style, over the output", -2.0, 2.0),
    RequestField("frequency_penalty", "float", 0.0, "OpenAI style, over the output", -2.0, 2.0),
    RequestField("ignore_eos", "bool", False, "keep going past end-of-sequence tokens (benchmarks)"),
    RequestField("stop_token_ids", "int_list", (), "token ids that end the output, beside the model's EOS",
                 0, INT32_MAX, max_items=64, on_bridge=False, on_http=False),
    RequestField("max_tokens_per_s", "float", 0.0, "pace the reply to at most this many tokens a second; 0 = unpaced",
                 0.0, 1000.0, scheduling=True),
    RequestField("ttft_deadline_ms", "float", 0.0, "first token wanted within this many ms (earliest deadline "
                 "first among equal priorities); 0 = none", 0.0, 3_600_000, scheduling=True),
    # Structured output (issue 21): at most one of these four; the output then always parses.
    RequestField("json_schema", "json", None, "the output is JSON valid under this JSON Schema; none: free text",
                 2, 65536, nullable=True, constraint=True),
    RequestField("regex", "str", None, "the output matches this regular expression (Rust regex syntax); none: off",
                 1, 4096, nullable=True, constraint=True),
    RequestField("grammar", "str", None, "the output follows this grammar (Lark, or llama.cpp's GBNF); none: off",
                 1, 65536, nullable=True, constraint=True),
    RequestField("choice", "str_list", (), "the output is exactly one of these strings", 1, 1024, max_items=256,
                 constraint=True),
    # NPC memory (issue #23).
    RequestField("cache_result", "bool", True, "a deterministic request (temperature 0 or a seed) may be answered "
                 "from, and stored in, the prompt-result cache; false = always decode", engine=True),
    RequestField("pin_prefix", "bool", False, "keep the KV of the request's system part (the whole prompt for a "
                 "raw prompt) resident until unpinned", engine=True),
)
FIELDS_BY_NAME: dict[str, RequestField] = {f.name: f for f in REQUEST_FIELDS}
SAMPLING_FIELDS: tuple[RequestField, ...] = tuple(f for f in REQUEST_FIELDS if not (f.scheduling or f.engine))
SCHEDULING_FIELDS: tuple[RequestField, ...] = tuple(f for f in REQUEST_FIELDS if f.scheduling)
ENGINE_FIELDS: tuple[RequestField, ...] = tuple(f for f in REQUEST_FIELDS if f.engine)
BRIDGE_FIELDS: tuple[RequestField, ...] = tuple(f for f in REQUEST_FIELDS if f.on_bridge)
CONSTRAINT_FIELDS: tuple[RequestField, ...] = tuple(f for f in REQUEST_FIELDS if f.constraint)

"""Protocol v1 of the gllm bridge: message schemas, validation, and the canonical encoding.

Pure functions, no sockets. `bindings/PROTOCOL.md` is the normative description; the tests parse
its test vectors and check them against this module, so the two cannot drift apart.

Every message is one msgpack map with a string ``op``. Decoding is strict about the types of the
fields it knows, lenient about fields it does not know (ignored: later minor versions may add
them), and treats a field set to nil exactly as a missing one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gllm.request_fields import BRIDGE_FIELDS, INT32_MAX, FieldError, RequestField, check_one_constraint

PROTOCOL_VERSION = 1

# ---------------------------------------------------------------------------------------- limits
DEFAULT_MAX_MESSAGE_BYTES = 1 << 20      # one frame, before decoding
MAX_FRAMES_PER_REPORT = 1_000_000      # frame reports' counts
MAX_ID_BYTES = 128                       # a request id, UTF-8
MAX_CLIENT_NAME_BYTES = 128
MAX_TOKEN_BYTES = 1024                   # hello.token
MAX_ROLE_BYTES = 64
MAX_MESSAGES = 1024                      # entries of generate.messages
MAX_MEMORY_TOKENS = 1 << 20              # token ids in a snapshot or pin message
MAX_EMBED_INPUTS = 256                   # strings in one embed message
SNAPSHOT_ENCODINGS = ("raw", "int8")
EMBED_POOLINGS = ("mean", "last")
# generate's optional fields, their defaults and bounds: the request field table's bridge fields.
GENERATE_FIELD_ORDER = tuple(f.wire_name for f in BRIDGE_FIELDS)
GENERATE_DEFAULTS: dict[str, Any] = {f.wire_name: list(f.default) if isinstance(f.default, tuple) else f.default
                                     for f in BRIDGE_FIELDS}

CLIENT_OPS = ("hello", "generate", "cancel", "ping", "frame", "idle", "stats",
              "snapshot", "restore", "pin", "unpin", "embed")                      # NPC memory (issue #23)
SERVER_OPS = ("welcome", "tokens", "done", "error", "pong", "stats",
              "snapshot", "restored", "pinned", "unpinned", "embeddings")          # NPC memory (issue #23)
FINISH_REASONS = ("stop", "length", "cancelled", "error")

# Error codes. The first six are the v1 core; the last two extend it.
BAD_REQUEST = "bad_request"      # not msgpack, not a map, a field of the wrong type or out of range
TOO_LONG = "too_long"            # the frame exceeds max_message_bytes, or prompt + max_tokens exceed the model's limits
BUSY = "busy"                    # too many requests in flight (this client's or the engine's), or too many clients
UNAUTHORIZED = "unauthorized"    # hello with a missing or wrong token
UNKNOWN_OP = "unknown_op"        # op is a string this server does not know
INTERNAL = "internal"            # the server failed; the request did not run
DUPLICATE_ID = "duplicate_id"    # generate reused an id still in flight; the request already running is unaffected
NO_SESSION = "no_session"        # anything but hello before a welcome (or after the session ended): send hello
ERROR_CODES = (BAD_REQUEST, TOO_LONG, BUSY, UNAUTHORIZED, UNKNOWN_OP, INTERNAL, DUPLICATE_ID, NO_SESSION)


class ProtocolError(Exception):
    """A message that cannot be accepted: answered with ``error{id, code, message}``."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id

    def to_message(self) -> dict[str, Any]:
        return error(self.request_id, self.code, self.message)


# ---------------------------------------------------------------------------------------- codec
def encode(message: dict[str, Any]) -> bytes:
    """The canonical encoding: shortest int and str forms, str (never bin) for text, float64 for floats,
    keys in the order the builders below put them."""
    return msgpack.packb(message, use_bin_type=True, use_single_float=False, strict_types=False)


def decode(frame: bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """One frame to one map; `ProtocolError` for anything that is not a single msgpack map."""
    if len(frame) > max_message_bytes:
        raise ProtocolError(TOO_LONG, f"message is {len(frame)} bytes; the limit is {max_message_bytes}")
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # every way msgpack can fail: truncated, extra data, bad UTF-8, depth, reserved bytes
        reason = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        raise ProtocolError(BAD_REQUEST, f"not a msgpack message ({reason})") from None
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, f"a message must be a msgpack map, got {_type_name(value)}")
    return value


# ---------------------------------------------------------------------------------------- client messages
@dataclass
class Hello:
    v: int
    client: str = ""
    token: str | None = None


@dataclass
class Generate:
    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    priority: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    max_tokens_per_s: float = 0.0
    ttft_deadline_ms: float = 0.0
    json_schema: str | None = None       # a map or JSON text on the wire; compact JSON text here
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] = field(default_factory=list)
    cache_result: bool = True         # NPC memory (issue #23)
    pin_prefix: bool = False


@dataclass
class Cancel:
    id: str


@dataclass
class Ping:
    t: Any = None


@dataclass
class Frame:
    ms: float                      # the game's (smoothed) frame time
    target_ms: float | None = None
    max_ms: float | None = None    # the longest frame since the previous report
    frames: int | None = None      # frames since the previous report
    over: int | None = None        # of those, frames over 1.1 x target


@dataclass
class Idle:
    ms: float                      # the game will not need the device for this long


@dataclass
class Stats:
    pass


# NPC memory (issue #23): each carries a client-chosen id that its reply (or error) carries back.
@dataclass
class Snapshot:
    id: str
    conversation: str | None = None       # a finished generate's id (this client's)
    tokens: list[int] | None = None       # or token ids
    encoding: str = "raw"


@dataclass
class Restore:
    id: str
    blob: bytes = b""


@dataclass
class Pin:
    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    tokens: list[int] | None = None


@dataclass
class Unpin:
    id: str
    pin: str = ""


@dataclass
class Embed:
    id: str
    input: list[str] = field(default_factory=list)
    pooling: str = "mean"


MemoryMessage = Snapshot | Restore | Pin | Unpin | Embed
ClientMessage = Hello | Generate | Cancel | Ping | Frame | Idle | Stats | MemoryMessage


def parse_client_message(frame: bytes, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> ClientMessage:
    """Decode and validate one client frame. Raises `ProtocolError`, whose `request_id` is set when the
    message was a generate with a readable id (the error then ends that request)."""
    return validate_client_message(decode(frame, max_message_bytes))


def validate_client_message(msg: dict[str, Any]) -> ClientMessage:
    op = msg.get("op")
    if op is None:
        raise ProtocolError(BAD_REQUEST, "op is missing")
    if not isinstance(op, str):
        raise ProtocolError(BAD_REQUEST, f"op must be a string, got {_type_name(op)}")
    if op == "generate":
        return _validate_generate(msg)
    if op == "hello":
        v = _get_int(msg, "v", required=True, lo=0, hi=INT32_MAX)
        if v < 1:
            raise ProtocolError(BAD_REQUEST, f"v must be >= 1 (this server speaks protocol {PROTOCOL_VERSION})")
        return Hello(v=v, client=_get_str(msg, "client", max_bytes=MAX_CLIENT_NAME_BYTES, default=""),
                     token=_get_str(msg, "token", max_bytes=MAX_TOKEN_BYTES, default=None))
    if op == "cancel":
        return Cancel(id=_get_id(msg))
    if op == "ping":
        return Ping(t=msg.get("t"))
    if op == "frame":
        frames = _get_int(msg, "frames", default=None, lo=0, hi=MAX_FRAMES_PER_REPORT)
        over = _get_int(msg, "over", default=None, lo=0, hi=MAX_FRAMES_PER_REPORT)
        if over is not None and frames is not None and over > frames:
            raise ProtocolError(BAD_REQUEST, f"over ({over}) must not exceed frames ({frames})")
        return Frame(ms=_get_float(msg, "ms", required=True, lo=0.0, hi=1e9),
                     target_ms=_get_float(msg, "target_ms", default=None, lo=0.0, hi=1e9),
                     max_ms=_get_float(msg, "max_ms", default=None, lo=0.0, hi=1e9), frames=frames, over=over)
    if op == "idle":
        return Idle(ms=_get_float(msg, "ms", required=True, lo=0.0, hi=1e9))
    if op == "stats":
        return Stats()
    if op in ("snapshot", "restore", "pin", "unpin", "embed"):
        return _validate_memory(op, msg)
    raise ProtocolError(UNKNOWN_OP, f"unknown op {_clip(op)!r}")


def readable_id(msg: Any) -> str | None:
    """The id of a generate message when it is a valid id string (errors about it carry the id)."""
    if isinstance(msg, dict) and msg.get("op") == "generate":
        rid = msg.get("id")
        if isinstance(rid, str) and 0 < len(rid.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES:
            return rid
    return None


def _validate_generate(msg: dict[str, Any]) -> Generate:
    rid = _get_id(msg)
    try:
        prompt = _get_str(msg, "prompt", default=None)
        messages = msg.get("messages")
        if (prompt is None) == (messages is None):
            raise ProtocolError(BAD_REQUEST, "give exactly one of prompt or messages")
        if messages is not None:
            messages = _check_messages(messages)
        fields = {f.wire_name: _get_field(msg, f) for f in BRIDGE_FIELDS}
        try:
            check_one_constraint({f.name: fields[f.wire_name] for f in BRIDGE_FIELDS})
        except FieldError as exc:
            raise ProtocolError(BAD_REQUEST, str(exc)) from None
        return Generate(id=rid, prompt=prompt, messages=messages, **fields)
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _validate_memory(op: str, msg: dict[str, Any]) -> MemoryMessage:
    rid = _get_id(msg)
    try:
        if op == "snapshot":
            conversation = _get_str(msg, "conversation", max_bytes=MAX_ID_BYTES, default=None)
            tokens = _get_tokens(msg)
            if (conversation is None) == (tokens is None):
                raise ProtocolError(BAD_REQUEST, "give exactly one of conversation or tokens")
            return Snapshot(rid, conversation, tokens, _get_choice(msg, "encoding", SNAPSHOT_ENCODINGS))
        if op == "restore":
            blob = msg.get("blob")
            if not isinstance(blob, (bytes, bytearray)) or not blob:
                raise ProtocolError(BAD_REQUEST, f"blob must be non-empty bin, got {_type_name(blob)}")
            return Restore(rid, bytes(blob))
        if op == "pin":
            prompt, messages, tokens = _get_str(msg, "prompt", default=None), msg.get("messages"), _get_tokens(msg)
            if sum(x is not None for x in (prompt, messages, tokens)) != 1:
                raise ProtocolError(BAD_REQUEST, "give exactly one of prompt, messages or tokens")
            return Pin(rid, prompt, None if messages is None else _check_messages(messages), tokens)
        if op == "unpin":
            pin = _get_str(msg, "pin", max_bytes=MAX_ID_BYTES, default=None)
            if not pin:
                raise ProtocolError(BAD_REQUEST, "pin (the id a pinned message gave) is missing")
            return Unpin(rid, pin)
        texts = msg.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, list) or not 0 < len(texts) <= MAX_EMBED_INPUTS or \
                not all(isinstance(t, str) and t for t in texts):
            raise ProtocolError(BAD_REQUEST, f"input must be a non-empty string or 1 to {MAX_EMBED_INPUTS} of them")
        return Embed(rid, texts, _get_choice(msg, "pooling", EMBED_POOLINGS))
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def _get_tokens(msg: dict[str, Any]) -> list[int] | None:
    tokens = msg.get("tokens")
    if tokens is None:
        return None
    if not isinstance(tokens, list) or not 0 < len(tokens) <= MAX_MEMORY_TOKENS or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX for t in tokens):
        raise ProtocolError(BAD_REQUEST, f"tokens must be 1 to {MAX_MEMORY_TOKENS} integers in [0, 2**31-1]")
    return tokens


def _get_choice(msg: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = msg.get(name)
    if value is None:
        return choices[0]
    if value not in choices:
        raise ProtocolError(BAD_REQUEST, f"{name} must be one of {', '.join(choices)}, got {_clip(repr(value))}")
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise ProtocolError(BAD_REQUEST, f"messages must be an array, got {_type_name(messages)}")
    if not 0 < len(messages) <= MAX_MESSAGES:
        raise ProtocolError(BAD_REQUEST, f"messages must hold 1 to {MAX_MESSAGES} entries, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ProtocolError(BAD_REQUEST, f"messages[{i}] must be a map, got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not 0 < _utf8_len(role) <= MAX_ROLE_BYTES:
            raise ProtocolError(BAD_REQUEST, f"messages[{i}].role must be a string of 1 to {MAX_ROLE_BYTES} bytes")
        if not isinstance(content, str):
            raise ProtocolError(BAD_REQUEST, f"messages[{i}].content must be a string, got {_type_name(content)}")
        out.append({"role": role, "content": content})
    return out


def _get_id(msg: dict[str, Any]) -> str:
    rid = msg.get("id")
    if not isinstance(rid, str):
        raise ProtocolError(BAD_REQUEST,
                            "id is missing" if rid is None else f"id must be a string, got {_type_name(rid)}")
    n = _utf8_len(rid)
    if not 0 < n <= MAX_ID_BYTES:
        raise ProtocolError(BAD_REQUEST, f"id must be 1 to {MAX_ID_BYTES} bytes of UTF-8, got {n}")
    return rid


def _get_field(msg: dict[str, Any], f: RequestField) -> Any:
    """A `generate` field checked against the request field table; nil or absent means the default."""
    value = msg.get(f.wire_name)
    if value is None:
        return GENERATE_DEFAULTS[f.wire_name]
    try:
        value = f.check(value, f.wire_name)
    except FieldError as exc:
        raise ProtocolError(BAD_REQUEST, str(exc)) from None
    if f.kind == "float":
        return float(value)
    return list(value) if isinstance(value, tuple) else value


def _get_str(msg: dict[str, Any], name: str, *, max_bytes: int | None = None, default: Any = None) -> Any:
    value = msg.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ProtocolError(BAD_REQUEST, f"{name} must be a string, got {_type_name(value)}")
    if max_bytes is not None and _utf8_len(value) > max_bytes:
        raise ProtocolError(BAD_REQUEST, f"{name} must be at most {max_bytes} bytes")
    return value


def _get_int(msg: dict[str, Any], name: str, *, lo: int, hi: int, default: Any = None,
             required: bool = False) -> Any:
    value = msg.get(name)
    if value is None:
        if required:
            raise ProtocolError(BAD_REQUEST, f"{name} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(BAD_REQUEST, f"{name} must be an integer, got {_type_name(value)}")
    if not lo <= value <= hi:
        raise ProtocolError(BAD_REQUEST, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _get_float(msg: dict[str, Any], name: str, *, lo: float, hi: float, default: Any = None,
               required: bool = False, lo_open: bool = False) -> Any:
    value = msg.get(name)
    if value is None:
        if required:
            raise ProtocolError(BAD_REQUEST, f"{name} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(BAD_REQUEST, f"{name} must be a number, got {_type_name(value)}")
    value = float(value) if isinstance(value, float) or abs(value) < 2**53 else math.inf
    if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or not value <= hi:
        bracket = "(" if lo_open else "["
        raise ProtocolError(BAD_REQUEST, f"{name} must be a finite number in {bracket}{lo:g}, {hi:g}], got {value!r}")
    return value


def _utf8_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _type_name(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray)):
        return "binary"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "map"
    return "extension"


def _clip(s: str, n: int = 64) -> str:
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------------------- builders
# Client → server (what the Python client sends; the key order is the documented one).
def hello(client: str = "", token: str | None = None, v: int = PROTOCOL_VERSION) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "hello", "v": v, "client": client}
    if token is not None:
        msg["token"] = token
    return msg


_FLOAT_FIELDS = frozenset(f.wire_name for f in BRIDGE_FIELDS if f.kind == "float")


def generate(id: str, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
             **params: Any) -> dict[str, Any]:
    """A generate message; parameters left out (or None) take the server's defaults."""
    unknown = set(params) - set(GENERATE_FIELD_ORDER)
    if unknown:
        raise TypeError(f"unknown generate parameters: {sorted(unknown)}")
    msg: dict[str, Any] = {"op": "generate", "id": id}
    if prompt is not None:
        msg["prompt"] = prompt
    if messages is not None:
        msg["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    for name in GENERATE_FIELD_ORDER:
        value = params.get(name)
        if value is not None:
            if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # floats always travel as float64
            if isinstance(value, tuple):
                value = list(value)
            msg[name] = value
    return msg


def cancel(id: str) -> dict[str, Any]:
    return {"op": "cancel", "id": id}


def ping(t: Any = None) -> dict[str, Any]:
    return {"op": "ping", "t": t}


def idle(ms: float) -> dict[str, Any]:
    return {"op": "idle", "ms": float(ms)}


def frame(ms: float, target_ms: float | None = None, max_ms: float | None = None, frames: int | None = None,
          over: int | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "frame", "ms": float(ms)}
    if target_ms is not None:
        msg["target_ms"] = float(target_ms)
    if max_ms is not None:
        msg["max_ms"] = float(max_ms)
    if frames is not None:
        msg["frames"] = int(frames)
    if over is not None:
        msg["over"] = int(over)
    return msg


def stats_request() -> dict[str, Any]:
    return {"op": "stats"}


# Server → client.
def welcome(model: str, max_seq_len: int, server: str, *, lease_ms: int, max_inflight: int,
            max_message_bytes: int, v: int = PROTOCOL_VERSION) -> dict[str, Any]:
    return {"op": "welcome", "v": v, "model": model, "max_seq_len": max_seq_len, "server": server,
            "lease_ms": lease_ms, "max_inflight": max_inflight, "max_message_bytes": max_message_bytes}


def token_item(id: str, text: str, n: int, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"id": id, "text": text, "n": n}
    if logprobs is not None:
        item["logprobs"] = logprobs
    return item


def logprob_entry(token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
    return {"token": int(token), "logprob": float(logprob), "top": [[int(t), float(lp)] for t, lp in top]}


def tokens(step: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"op": "tokens", "step": step, "items": items}


def done(id: str, finish_reason: str, text: str, prompt_tokens: int, completion_tokens: int,
         ttft_ms: float | None, total_ms: float, error: str | None = None,
         cached_tokens: int = 0, ttft_deadline_met: bool | None = None, cached: bool = False) -> dict[str, Any]:
    timings: dict[str, Any] = {"ttft_ms": None if ttft_ms is None else float(ttft_ms), "total_ms": float(total_ms)}
    if ttft_deadline_met is not None:
        timings["ttft_deadline_met"] = bool(ttft_deadline_met)
    msg: dict[str, Any] = {
        "op": "done", "id": id, "finish_reason": finish_reason, "text": text,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "cached_tokens": cached_tokens},
        "timings": timings,
    }
    if cached:   # answered from the prompt-result cache (only then: older clients' vectors stay as they were)
        msg["usage"]["cached"] = True
    if error is not None:
        msg["error"] = error
    return msg


# NPC memory (issue #23): client requests, then the server's replies.
def snapshot_request(id: str, conversation: str | None = None, tokens: list[int] | None = None,
                     encoding: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "snapshot", "id": id}
    if conversation is not None:
        msg["conversation"] = conversation
    if tokens is not None:
        msg["tokens"] = list(tokens)
    if encoding is not None:
        msg["encoding"] = encoding
    return msg


def restore(id: str, blob: bytes) -> dict[str, Any]:
    return {"op": "restore", "id": id, "blob": bytes(blob)}


def pin(id: str, prompt: str | None = None, messages: list[dict[str, str]] | None = None,
        tokens: list[int] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "pin", "id": id}
    if prompt is not None:
        msg["prompt"] = prompt
    if messages is not None:
        msg["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages]
    if tokens is not None:
        msg["tokens"] = list(tokens)
    return msg


def unpin(id: str, pin: str) -> dict[str, Any]:
    return {"op": "unpin", "id": id, "pin": pin}


def embed(id: str, input: str | list[str], pooling: str | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "embed", "id": id, "input": input if isinstance(input, str) else list(input)}
    if pooling is not None:
        msg["pooling"] = pooling
    return msg


def snapshot(id: str, tokens: int, blob: bytes) -> dict[str, Any]:
    """The one server message with a bin value: the snapshot blob (PROTOCOL.md §5.3)."""
    return {"op": "snapshot", "id": id, "tokens": tokens, "blob": bytes(blob)}


def restored(id: str, tokens: int, new_blocks: int) -> dict[str, Any]:
    return {"op": "restored", "id": id, "tokens": tokens, "new_blocks": new_blocks}


def pinned(id: str, pin: str, tokens: int) -> dict[str, Any]:
    return {"op": "pinned", "id": id, "pin": pin, "tokens": tokens}


def unpinned(id: str, pin: str, found: bool) -> dict[str, Any]:
    return {"op": "unpinned", "id": id, "pin": pin, "found": found}


def embeddings(id: str, vectors: list[list[float]], prompt_tokens: int) -> dict[str, Any]:
    return {"op": "embeddings", "id": id, "vectors": [[float(x) for x in v] for v in vectors],
            "prompt_tokens": prompt_tokens}


def error(id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"op": "error", "id": id, "code": code, "message": message}


def pong(t: Any) -> dict[str, Any]:
    return {"op": "pong", "t": t}


STATS_FIELD_ORDER = ("kv_free_blocks", "kv_total_blocks", "running", "waiting", "prefix_cache_hits",
                     "prefix_cache_misses", "steps", "clients", "inflight")


def stats(values: dict[str, Any]) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "stats"}
    for name in STATS_FIELD_ORDER:
        if name in values:
            msg[name] = values[name]
    for name, value in values.items():  # anything newer the engine reports, after the documented ones
        if name not in msg and isinstance(value, (int, float, str, bool)) and name != "op":
            msg[name] = value
    return msg

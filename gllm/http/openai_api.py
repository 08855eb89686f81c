"""OpenAI's chat-completions and completions wire formats: request bodies in, JSON and SSE chunks out.

Pure functions and small classes, no I/O: `parse_chat` / `parse_completion` turn a decoded JSON body
into a `GenerationRequest` (raising `ApiError` 400 with the offending ``param``), and the
``*_response`` / ``*_chunk`` functions build what the client reads back.

Fields the engine cannot honour are refused with a clear 400 rather than silently ignored (``n`` other
than 1, ``logit_bias``, ``echo``, ``suffix``, ``best_of``, legacy ``functions``); fields that change nothing
here (``user``, ``metadata``, ``store``, ``service_tier``, ...) are accepted and ignored, as are unknown ones,
since SDKs send their ``extra_body`` as top-level fields. gllm's own extras: ``top_k``, ``min_p``,
``priority``, ``repetition_penalty``, ``ignore_eos``, and the structured-output fields ``json_schema``,
``regex``, ``grammar``, ``choice``.

Structured output: ``response_format`` (``json_object``, ``json_schema``) becomes the request's
``json_schema``; ``tools`` with ``tool_choice`` ``required`` or a named function constrain the reply to a
call ``{"name": ..., "parameters": {...}}`` (the Llama 3.1 form) valid under the function's parameter schema,
``auto`` to either such a call or text that does not start with ``{`` (with ``response_format`` too: a call
or the JSON it asks for; a forced call ignores it, there being no text to shape); a reply that is a call
comes back as ``tool_calls`` with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from gllm.engine.errors import EngineBusy, RequestRejected, RequestTooLong
from gllm.engine.request import GenerationRequest, GenerationResult
from gllm.frontend.helpers import preview as _preview
from gllm.http.errors import ApiError, bad_request
from gllm.request_fields import FIELDS_BY_NAME, REQUEST_FIELDS, FieldError, RequestField

MAX_TOP_LOGPROBS = FIELDS_BY_NAME["logprobs"].hi
CHAT_ROLES = {"system", "developer", "user", "assistant", "tool", "ipython"}
FINISH_REASONS = {"stop": "stop", "length": "length"}
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MISSING = object()


@dataclass
class ToolPlan:
    """The request's function tools and how the reply may use them."""
    tools: list[dict[str, Any]]   # as the chat template takes them: {"type": "function", "function": {...}}
    choice: str                   # "auto", "required", "none", or a function's name

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    @property
    def constrained(self) -> bool:
        return self.choice != "none"

    @property
    def always(self) -> bool:
        """The reply is a call, whatever the model would say."""
        return self.choice not in ("auto", "none")


@dataclass
class ParsedRequest:
    kind: str                     # "chat" or "completion"
    request: GenerationRequest
    model: str                    # the model name echoed back
    stream: bool
    include_usage: bool
    logprobs: bool                # return logprobs at all
    preview: str                  # a short form of the prompt for the dashboard
    tools: ToolPlan | None = None
    # The body's name for an engine field set from another OpenAI field (json_schema from response_format).
    params: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- field checks
def _get(body: dict[str, Any], name: str) -> Any:
    value = body.get(name, _MISSING)
    return _MISSING if value is None else value


def _number(body: dict[str, Any], name: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", param=name)
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        low = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise bad_request(f"{name} must be {' and '.join(x for x in (low, high) if x)}, got {value!r}", param=name)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", param=name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        low = "" if lo is None else f">= {lo}"
        high = "" if hi is None else f"<= {hi}"
        raise bad_request(f"{name} must be {' and '.join(x for x in (low, high) if x)}, got {value}", param=name)
    return value


def _boolean(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = _get(body, name)
    if value is _MISSING:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    value = _get(body, "stop")
    if value is _MISSING:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    try:
        return list(FIELDS_BY_NAME["stop"].check(value))
    except FieldError as exc:
        raise bad_request(str(exc), param="stop") from None


def _refuse_unsupported(body: dict[str, Any], kind: str) -> None:
    n = _integer(body, "n", 1)
    if n != 1:
        raise bad_request(f"n must be 1, got {n}: gllm returns one choice per request (send several requests, "
                          f"with different seeds, for several answers)", param="n")
    if kind == "completion":
        best_of = _integer(body, "best_of", 1)
        if best_of != 1:
            raise bad_request(f"best_of must be 1, got {best_of}", param="best_of")
        if _boolean(body, "echo"):
            raise bad_request("echo is not supported", param="echo")
        if _get(body, "suffix") not in (_MISSING, ""):
            raise bad_request("suffix is not supported", param="suffix")
    if _get(body, "logit_bias") not in (_MISSING, {}):
        raise bad_request("logit_bias is not supported", param="logit_bias")
    if _get(body, "functions") not in (_MISSING, []) or _get(body, "function_call") is not _MISSING:
        raise bad_request("functions and function_call are the deprecated form: send tools and tool_choice",
                          param="functions")
    if kind == "completion" and _get(body, "tools") not in (_MISSING, []):
        raise bad_request("tools need /v1/chat/completions", param="tools")
    for name in ("audio", "prediction"):
        if _get(body, name) is not _MISSING:
            raise bad_request(f"{name} is not supported", param=name)
    if _get(body, "modalities") not in (_MISSING, ["text"]):
        raise bad_request("modalities: only [\"text\"] is supported", param="modalities")


def _max_tokens(body: dict[str, Any], default: int) -> int:
    f = FIELDS_BY_NAME["max_new_tokens"]
    name = "max_completion_tokens" if _get(body, "max_completion_tokens") is not _MISSING else "max_tokens"
    return _integer(body, name, default, lo=f.lo, hi=f.hi)


def _table_field(body: dict[str, Any], f: RequestField, param: str | None = None) -> Any:
    """A field of the request field table under its OpenAI name; absent or null means the default. Errors
    name `param` (default: the field's OpenAI name)."""
    value = _get(body, f.wire_name)
    if value is _MISSING:
        return f.default
    if f.kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)                                      # JSON writers may send 5.0
    param = param or f.wire_name
    try:
        return f.check(value, param)
    except FieldError as exc:
        raise bad_request(str(exc), param=param) from None


_SPECIAL = {"max_new_tokens", "seed", "stop"}                   # OpenAI-specific forms, read below


def _sampling_fields(body: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    stream_options = _get(body, "stream_options")
    if stream_options is not _MISSING and not isinstance(stream_options, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    fields = {f.name: _table_field(body, f) for f in REQUEST_FIELDS if f.on_http and f.name not in _SPECIAL}
    seed = _integer(body, "seed", None, lo=-(2**63), hi=2**64 - 1)
    fields["seed"] = None if seed is None else seed % 2**64    # OpenAI takes any 64-bit integer
    fields["max_new_tokens"] = _max_tokens(body, default_max_tokens)
    fields["stop"] = _stop(body)
    return fields


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _boolean(body, "stream")
    options = _get(body, "stream_options")
    include_usage = False
    if isinstance(options, dict) and options.get("include_usage") is not None:
        include_usage = options["include_usage"]
        if not isinstance(include_usage, bool):
            raise bad_request("stream_options.include_usage must be true or false", param="stream_options")
    return stream, include_usage


def _text_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"{where}: only text content parts are supported, got {kind!r}", param="messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}: a text part needs a string 'text'", param="messages")
            parts.append(text)
        return "".join(parts)
    raise bad_request(f"{where}: content must be a string or a list of text parts", param="messages")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = _get(body, "messages")
    if messages is _MISSING:
        raise bad_request("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with role and content", param="messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}", param="messages")
        entry: dict[str, Any] = {"role": "system" if role == "developer" else role,
                                 "content": _text_content(m.get("content"), where)}
        if m.get("tool_calls"):
            if role != "assistant":
                raise bad_request(f"{where}: only assistant messages carry tool_calls", param="messages")
            entry["tool_calls"] = _past_tool_calls(m["tool_calls"], where)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            entry["tool_call_id"] = m["tool_call_id"]
        out.append(entry)
    return out


def _past_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant's earlier tool calls, as chat templates take them (arguments as an object, not JSON text)."""
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{where}.tool_calls[{j}] must have a function with a name", param="messages")
        arguments = fn.get("arguments", "{}")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            raise bad_request(f"{where}.tool_calls[{j}].function.arguments must be JSON text",
                              param="messages") from None
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _response_format(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema that `response_format` asks for (None: free text)."""
    fmt = _get(body, "response_format")
    if fmt is _MISSING:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise bad_request("response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
                          param="response_format")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema must be an object with a name and a schema",
                          param="response_format")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise bad_request("response_format.json_schema.strict must be true or false", param="response_format")
    schema = spec.get("schema", {})       # no schema: any JSON value
    if not isinstance(schema, dict):
        raise bad_request("response_format.json_schema.schema must be a JSON Schema object", param="response_format")
    return schema                         # strict or not, the output always follows the schema exactly


def _tool_plan(body: dict[str, Any]) -> ToolPlan | None:
    tools, choice = _get(body, "tools"), _get(body, "tool_choice")
    if tools in (_MISSING, []):
        if choice not in (_MISSING, "none", "auto"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad_request(f"tools must be a list of at most {MAX_TOOLS} functions", param="tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not TOOL_NAME.fullmatch(fn["name"]):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} with a "
                              f"name of 1-64 letters, digits, _ or -", param="tools")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object", param="tools")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad_request(f"tools[{i}].function.description must be a string", param="tools")
        out.append({"type": "function", "function": {k: fn[k] for k in ("name", "description", "parameters")
                                                     if fn.get(k) is not None}})
    plan = ToolPlan(out, "auto")
    if len(set(plan.names)) != len(out):
        raise bad_request("tools must have distinct names", param="tools")
    if choice is _MISSING:
        return plan
    if choice in ("auto", "none", "required"):
        plan.choice = choice
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and choice["function"].get("name") in plan.names):
        plan.choice = choice["function"]["name"]
    else:
        raise bad_request(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": one of {plan.names}}}}}", param="tool_choice")
    return plan


def tool_call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON Schema of a call of the plan's functions (just the named one when one is named)."""
    options = [{"type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "parameters": t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", "parameters"], "additionalProperties": False}
               for t in plan.tools if plan.choice in ("auto", "required", t["function"]["name"])]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _tool_constraint(plan: ToolPlan) -> dict[str, Any]:
    """The request fields that make the reply a call (required, named) or a call or text (auto)."""
    if plan.always:
        return {"json_schema": tool_call_schema(plan)}
    # Text may be anything that does not start with "{": so a reply that does is a whole, valid call.
    return {"grammar": "start: TEXT | call\nTEXT: /[^{](.|\\n)*/\ncall: %json "
                       + json.dumps(tool_call_schema(plan), ensure_ascii=False)}


def parse_tool_call(plan: ToolPlan | None, text: str) -> dict[str, Any] | None:
    """The reply as an OpenAI tool call, if it is one (a complete call the constraint let through)."""
    if plan is None or not plan.constrained or not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    # Exactly a call's two keys: with response_format beside tools, other JSON objects are text.
    if not isinstance(call, dict) or set(call) != {"name", "parameters"} or call["name"] not in plan.names:
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("parameters", {}), ensure_ascii=False)}}


def _structured_fields(body: dict[str, Any], fields: dict[str, Any], plan: ToolPlan | None) -> dict[str, str]:
    """Put response_format's schema or the tools' constraint into `fields`; returns the body's names of the
    engine fields so set (for errors). With both: a forced call is the call (response_format shapes text, and
    there is none); with tool_choice "auto" the reply is a call or text following response_format."""
    schema = _response_format(body)
    given = [f.name for f in REQUEST_FIELDS if f.constraint and fields.get(f.name) not in (None, ())]
    tools = plan is not None and plan.constrained
    if given and (schema is not None or tools):
        first = "response_format" if schema is not None else "tools"
        raise bad_request(f"{first} cannot be combined with {given[0]}", param=first)
    if schema is not None and not (tools and plan.always):
        if tools:   # a call, or the text response_format asks for (told apart by `parse_tool_call`)
            schema = {"anyOf": [tool_call_schema(plan), schema]}
        fields["json_schema"] = _table_field({"json_schema": schema}, FIELDS_BY_NAME["json_schema"], "response_format")
        return {"json_schema": "response_format"}
    if tools:
        extra = _tool_constraint(plan)
        for name in extra:
            fields[name] = _table_field(extra, FIELDS_BY_NAME[name], "tools")
        return {name: "tools" for name in extra}
    return {}


def check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def requested_model(body: dict[str, Any]) -> str | None:
    model = _get(body, "model")
    if model is _MISSING:
        return None
    if not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    return model


def parse_chat(body: dict[str, Any], model: str, request_id: str, default_max_tokens: int) -> ParsedRequest:
    _refuse_unsupported(body, "chat")
    messages = _messages(body)
    plan = _tool_plan(body)
    fields = _sampling_fields(body, default_max_tokens)
    params = _structured_fields(body, fields, plan)
    stream, include_usage = _stream_flags(body)
    want_logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not want_logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    req = GenerationRequest(messages=messages, logprobs=(top or 0) if want_logprobs else None,
                            request_id=request_id, tools=plan.tools if plan is not None else None, **fields)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
    return ParsedRequest("chat", req, model, stream, include_usage, want_logprobs, _preview(last_user), plan, params)


def parse_completion(body: dict[str, Any], model: str, request_id: str, default_max_tokens: int) -> ParsedRequest:
    _refuse_unsupported(body, "completion")
    prompt = _get(body, "prompt")
    if prompt is _MISSING:
        raise bad_request("prompt is required", param="prompt")
    prompt_ids = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]                                     # a batch of one
    if isinstance(prompt, list):
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids, prompt = prompt, None
        else:
            raise bad_request("prompt must be a string, a list of token ids, or a list holding one of those "
                              "(gllm takes one prompt per request)", param="prompt")
    elif not isinstance(prompt, str):
        raise bad_request("prompt must be a string or a list of token ids", param="prompt")
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    fields = _sampling_fields(body, default_max_tokens)
    params = _structured_fields(body, fields, None)
    stream, include_usage = _stream_flags(body)
    logprobs = _integer(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    req = GenerationRequest(prompt=prompt, prompt_token_ids=prompt_ids, logprobs=logprobs, request_id=request_id,
                            **fields)
    preview = _preview(prompt) if prompt is not None else f"[{len(prompt_ids)} token ids]"
    return ParsedRequest("completion", req, model, stream, include_usage, logprobs is not None, preview,
                         params=params)


# ----------------------------------------------------------------------------------------- engine errors
# The engine's field names that have another name (or none) in the OpenAI request.
_ENGINE_PARAMS = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt", "request_id": None}


def engine_error(exc: Exception, kind: str, params: dict[str, str] | None = None) -> ApiError:
    """Map what `LLMEngine.add_request` raised to an HTTP error; `params` names the body's field behind an engine
    field set from another one (`ParsedRequest.params`)."""
    message = str(exc)
    if isinstance(exc, RuntimeError):                           # the engine is closed
        return ApiError(503, f"the engine is not accepting requests: {message}", code="unavailable")
    if isinstance(exc, EngineBusy):
        return ApiError(503, f"the server is overloaded: {message}; retry later", code="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestTooLong):
        return bad_request(message, param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    field = exc.field if isinstance(exc, (FieldError, RequestRejected)) else None
    param = (params or {}).get(field) or _ENGINE_PARAMS.get(
        field, FIELDS_BY_NAME[field].wire_name if field in FIELDS_BY_NAME else field)
    if param == "logprobs" and kind == "chat":
        param = "top_logprobs"
    return bad_request(message, param=param)


# ----------------------------------------------------------------------------------------- token text
class TokenText:
    """A token id's text and raw bytes for logprobs, cached (bounded)."""

    def __init__(self, tokenizer: Any, capacity: int = 65536) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._cache: OrderedDict[int, tuple[str, list[int]]] = OrderedDict()

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        raw = self.tokenizer.token_bytes(token_id) if text and "\ufffd" in text else None
        # A partial UTF-8 character decodes to U+FFFD: its real bytes come from the vocabulary.
        entry = (text, list(raw) if raw is not None else list(text.encode("utf-8")))
        self._cache[token_id] = entry
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return entry


def _lp(value: float) -> float:
    """A logprob JSON can carry: -inf (a token the model rules out) becomes -9999.0, as OpenAI writes it."""
    return value if math.isfinite(value) else -9999.0


def chat_logprobs(lps: list[Any] | None, token_text: TokenText) -> dict[str, Any] | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        text, raw = token_text(lp.token_id)
        top = []
        for tid, value in lp.top:
            t_text, t_raw = token_text(tid)
            top.append({"token": t_text, "logprob": _lp(value), "bytes": t_raw})
        content.append({"token": text, "logprob": _lp(lp.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(lps: list[Any] | None, token_text: TokenText, offset: int) -> tuple[dict[str, Any] | None, int]:
    """The legacy completions logprobs object; returns it with the text offset after its tokens."""
    if lps is None:
        return None, offset
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = token_text(lp.token_id)
        tokens.append(text)
        values.append(_lp(lp.logprob))
        tops.append({token_text(tid)[0]: _lp(value) for tid, value in lp.top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


# ----------------------------------------------------------------------------------------- responses
def usage(result: GenerationResult) -> dict[str, Any]:
    u = result.usage
    out = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
           "total_tokens": u.prompt_tokens + u.completion_tokens,
           "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}
    if u.cached:   # gllm extension: the whole result came from the prompt-result cache
        out["cached"] = True
    return out


def timings(result: GenerationResult) -> dict[str, Any]:
    t = result.timings
    return {"queued_ms": t.queued_ms, "ttft_ms": t.ttft_ms, "total_ms": t.total_ms}


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def _envelope(parsed: ParsedRequest, request_id: str, created: int, obj: str) -> dict[str, Any]:
    return {"id": request_id, "object": obj, "created": created, "model": parsed.model,
            "system_fingerprint": None}


def chat_response(parsed: ParsedRequest, result: GenerationResult, created: int, token_text: TokenText) -> dict:
    out = _envelope(parsed, result.request_id, created, "chat.completion")
    call = parse_tool_call(parsed.tools, result.text) if result.finish_reason == "stop" else None
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    if call is not None:
        message.update(content=None, tool_calls=[call])
    out["choices"] = [{
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(result.logprobs, token_text) if parsed.logprobs else None,
        "finish_reason": "tool_calls" if call is not None else finish_reason(result),
    }]
    out["usage"] = usage(result)
    out["gllm"] = {"timings": timings(result), "num_preemptions": result.num_preemptions}
    return out


def completion_response(parsed: ParsedRequest, result: GenerationResult, created: int, token_text: TokenText) -> dict:
    out = _envelope(parsed, result.request_id, created, "text_completion")
    lp = completion_logprobs(result.logprobs, token_text, 0)[0] if parsed.logprobs else None
    out["choices"] = [{"index": 0, "text": result.text, "logprobs": lp, "finish_reason": finish_reason(result)}]
    out["usage"] = usage(result)
    out["gllm"] = {"timings": timings(result), "num_preemptions": result.num_preemptions}
    return out


class ChunkWriter:
    """Turns a request's stream events into the SSE chunks of its endpoint."""

    def __init__(self, parsed: ParsedRequest, request_id: str, token_text: TokenText,
                 created: int | None = None) -> None:
        self.parsed = parsed
        self.request_id = request_id
        self.token_text = token_text
        self.created = created if created is not None else int(time.time())
        self.offset = 0
        self.chat = parsed.kind == "chat"
        # A reply that may be a tool call is held back until it ends (then sent as tool_calls, or as text):
        # always under tool_choice required / a named function, and under auto once it starts with "{".
        plan = parsed.tools if self.chat else None
        self.holding: bool | None = None if plan is not None and plan.constrained and not plan.always else (
            plan is not None and plan.always)
        self.held = ""

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out = _envelope(self.parsed, self.request_id, self.created,
                        "chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = choices
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def first(self) -> dict[str, Any] | None:
        """The chat stream opens with the assistant role (completions have no opening chunk)."""
        if not self.chat:
            return None
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta(self, text: str, lps: list[Any] | None, finish: str | None = None) -> dict[str, Any] | None:
        """A chunk for new text/logprobs (None when there is nothing to say)."""
        if self.holding is None and text:
            self.holding = text.startswith("{")
        if self.holding:
            self.held += text
            return None
        want_lp = self.parsed.logprobs and lps
        if not text and not want_lp and finish is None:
            return None
        if self.chat:
            choice = {"index": 0, "delta": {"content": text} if text or want_lp else {},
                      "logprobs": chat_logprobs(lps, self.token_text) if want_lp else None,
                      "finish_reason": finish}
        else:
            lp = None
            if want_lp:
                lp, self.offset = completion_logprobs(lps, self.token_text, self.offset)
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._chunk([choice])

    def final(self, result: GenerationResult) -> list[dict[str, Any]]:
        out = []
        if self.chat and self.holding:
            call = parse_tool_call(self.parsed.tools, result.text) if result.finish_reason == "stop" else None
            delta = ({"tool_calls": [{"index": 0, **call}]} if call is not None else {"content": self.held})
            out.append(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]))
            out.append(self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                     "finish_reason": "tool_calls" if call is not None else finish_reason(result)}]))
        elif self.chat:
            out.append(self._chunk([{"index": 0, "delta": {}, "logprobs": None,
                                     "finish_reason": finish_reason(result)}]))
        else:
            out.append(self._chunk([{"index": 0, "text": "", "logprobs": None,
                                     "finish_reason": finish_reason(result)}]))
        if self.parsed.include_usage:
            last = self._chunk([])
            last["usage"] = usage(result)
            last["gllm"] = {"timings": timings(result)}
            out.append(last)
        return out

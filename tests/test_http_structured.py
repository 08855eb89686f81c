"""Structured output over the OpenAI API, with the official `openai` client against a real `python -m gllm.http`
on the tiny random model: response_format json_schema / json_object and tool calls (required, named, auto,
none), streaming and not, all parse and validate; bad schemas are 400 naming the field; role "tool" messages
and earlier tool calls are accepted back."""

from __future__ import annotations

import json

import jsonschema
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
from test_http import Http, sse_events, start_server, stop_server  # noqa: E402

MODEL_ID = "tiny-llama32"
CHAT = [{"role": "system", "content": "You are the gate guard."}, {"role": "user", "content": "Let me in!"}]
DECISION = {"type": "object", "properties": {
    "action": {"type": "string", "enum": ["open_gate", "refuse", "call_captain"]},
    "say": {"type": "string", "maxLength": 24}},
    "required": ["action", "say"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "open_gate", "description": "Open the town gate",
                                      "parameters": {"type": "object", "properties": {
                                          "gate": {"type": "string", "enum": ["north", "south"]},
                                          "minutes": {"type": "integer", "minimum": 1, "maximum": 60}},
                                          "required": ["gate", "minutes"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "arrest", "parameters": {"type": "object", "properties": {
        "who": {"type": "string", "maxLength": 10}}, "required": ["who"], "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(llama32_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("http-structured") / "server.log"
    proc, url = start_server(llama32_dir, log, "--max-seq-len", "512", "--max-batch-size", "4")
    yield url
    assert stop_server(proc) == 0, log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def response_format(schema=DECISION, strict=True):
    return {"type": "json_schema", "json_schema": {"name": "decision", "schema": schema, "strict": strict}}


def test_response_format_json_schema_parses_and_validates(client):
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=120, seed=seed,
                                           response_format=response_format())
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), DECISION)


def test_response_format_streamed_parses_and_validates(client):
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=120, seed=5, stream=True,
                                            response_format=response_format(strict=False))
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(parts)), DECISION)


def test_json_object_and_completions_take_response_format(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=200, seed=1,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason in ("stop", "length")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL_ID, prompt="Guard:", max_tokens=120, seed=2,
                                  extra_body={"response_format": response_format()})
    jsonschema.validate(json.loads(r.choices[0].text), DECISION)


def test_gllm_extras_regex_and_choice(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=20,
                                       extra_body={"choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL_ID, prompt="Code:", max_tokens=20, extra_body={"regex": "[0-9]{3}-[A-Z]"})
    assert len(r.choices[0].text) == 5 and r.choices[0].text[3] == "-"


def check_call(call, name=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert name is None or call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def collect(stream) -> tuple[list, str, str | None]:
    """A streamed chat reply's tool calls, text and finish reason."""
    calls, content, finish = [], "", None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return calls, content, finish


def test_forced_and_named_tool_calls_return_valid_tool_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        check_call(choice.message.tool_calls[0])
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, max_tokens=120,
                                       tool_choice={"type": "function", "function": {"name": "arrest"}})
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message.tool_calls[0], "arrest")


def test_a_forced_tool_call_streams_as_tool_calls(client):
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, tool_choice="required",
                                            max_tokens=120, seed=3, stream=True)
    calls, content, finish = collect(stream)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    check_call(calls[0])


def test_auto_is_text_or_a_valid_call_and_none_is_text(client):
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, max_tokens=60, seed=seed,
                                           temperature=1.5)
        choice = r.choices[0]
        if choice.finish_reason == "tool_calls":
            check_call(choice.message.tool_calls[0])
            seen.add("call")
        else:
            assert not choice.message.tool_calls and not choice.message.content.startswith("{")
            seen.add("text")
    assert seen
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, tool_choice="none", max_tokens=8,
                                       seed=1)
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls


def test_response_format_with_tools_is_a_valid_call_or_schema_valid_text(client):
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, max_tokens=120, seed=seed,
                                           temperature=1.5, response_format=response_format())
        choice = r.choices[0]
        if choice.finish_reason == "tool_calls":
            check_call(choice.message.tool_calls[0])
            seen.add("call")
        else:
            assert choice.finish_reason == "stop" and not choice.message.tool_calls
            jsonschema.validate(json.loads(choice.message.content), DECISION)
            seen.add("text")
    assert seen
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, max_tokens=120, seed=2,
                                            temperature=1.5, response_format=response_format(), stream=True)
    calls, content, finish = collect(stream)
    if finish == "tool_calls":
        check_call(calls[0])
    else:
        jsonschema.validate(json.loads(content), DECISION)
    # A forced call is the call: response_format shapes text, and there is none.
    r = client.chat.completions.create(model=MODEL_ID, messages=CHAT, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, seed=1, response_format=response_format())
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message.tool_calls[0])


def test_tool_results_come_back_as_tool_messages(client):
    messages = CHAT + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "open_gate", "arguments": json.dumps({"gate": "north", "minutes": 5})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "The north gate is open."}]
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=8, seed=1,
                                       tool_choice="none")
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"response_format": response_format({"type": "frobnicate"})}, "response_format"),
    ({"response_format": response_format({"properties": {"a": {"$ref": "#/missing"}}})}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "regex": "a"}, "response_format"),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, "tools"),
    ({"regex": "(("}, "regex"),
    ({"json_schema": {"type": "nope"}}, "json_schema"),
    ({"regex": "a", "choice": ["a"]}, "choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_a_bad_schema_or_tool_is_400_naming_the_field(server, body, param):
    status, out = Http(server).json("POST", "/v1/chat/completions",
                                    {"model": MODEL_ID, "messages": CHAT, "max_tokens": 4, **body})
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error", out
    assert Http(server).json("GET", "/health")[0] == 200


def test_the_openai_client_raises_bad_request_for_a_bad_schema(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=4,
                                       response_format=response_format({"type": "frobnicate"}))
    assert err.value.body["param"] == "response_format" and "frobnicate" in err.value.body["message"]


def test_raw_sse_of_a_tool_call(server):
    conn, resp = Http(server).open_stream("/v1/chat/completions", {
        "model": MODEL_ID, "messages": CHAT, "tools": TOOLS, "max_tokens": 120, "seed": 4,
        "tool_choice": {"type": "function", "function": {"name": "open_gate"}}})
    events = list(sse_events(resp))
    conn.close()
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0]["index"] == 0 and calls[0]["function"]["name"] == "open_gate"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), PARAMS["open_gate"])
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"

"""A hostile value in any request field fails only its own request, over HTTP and the bridge, against one
real `gllm serve --zmq ... --http ...`: six streaming victims (three per front end) finish normally while
every out-of-range value is refused with an error naming the field. The probe that found this sent
`top_k = 2**70` over HTTP, and every request batched with it failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from gllm.bridge.client import BridgeClient, BridgeError
from gllm.request_fields import BRIDGE_FIELDS, FIELDS_BY_NAME, REQUEST_FIELDS

VICTIM_TOKENS = 40

# One hostile value (or more) per field of the table, as each front end names it.
HOSTILE = {
    "max_tokens": [2**70, 0], "temperature": [1e308, -1.0], "top_k": [2**70, -1], "top_p": [2.0, 0.0],
    "min_p": [-0.5, 7.0], "seed": [2**70], "stop": [["x"] * 1000, [""]], "logprobs": [10**6],
    "priority": [2**70], "repetition_penalty": [1e308, 0.0], "presence_penalty": [1e9],
    "frequency_penalty": [-1e9], "ignore_eos": ["yes"], "max_tokens_per_s": [1e308, -1.0],
    "ttft_deadline_ms": [1e12, -5.0],
    "json_schema": [{"type": "frobnicate"}, "{not json", [1]], "regex": ["(unclosed", ""],
    "grammar": ["start: nowhere", "x" * 70000], "choice": [[""], "yes"],
    "cache_result": ["no", 0], "pin_prefix": [1, "yes"],
}

# msgpack carries integers up to 2**64-1; every seed up to there is valid on the bridge (over HTTP a negative
# seed is valid: OpenAI's are signed).
HOSTILE_ON_THE_BRIDGE = {
    **{name: [min(v, 2**64 - 1) if isinstance(v, int) else v for v in values] for name, values in HOSTILE.items()},
    "seed": [-1],
}


def test_every_bridge_and_http_field_has_hostile_values():
    wire = {f.wire_name for f in REQUEST_FIELDS if f.on_bridge or f.on_http} | {"logprobs", "max_tokens"}
    assert wire == set(HOSTILE)
    assert {f.wire_name for f in BRIDGE_FIELDS} == set(HOSTILE_ON_THE_BRIDGE)


@pytest.fixture(scope="module")
def server(llama32_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("GLLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "gllm.cli", "serve", "--model", str(llama32_dir),
                             "--zmq", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0", "--max-seq-len", "256",
                             "--max-batch-size", "8", "--cpu-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    endpoints: dict[str, str] = {}
    deadline = time.time() + 120
    while len(endpoints) < 2 and time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "gllm serve exited before listening"
        for kind in ("bridge", "http"):
            prefix = f"gllm {kind} listening on "
            if line.startswith(prefix):
                endpoints[kind] = line[len(prefix):].strip()
    yield endpoints
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _http_victim(url: str, i: int, out: dict) -> None:
    body = {"model": "tiny-llama32", "prompt": f"Victim {i} says", "max_tokens": VICTIM_TOKENS,
            "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    finish, usage, error = None, None, None
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]
            for choice in chunk.get("choices", []):
                finish = choice.get("finish_reason") or finish
            usage = chunk.get("usage") or usage
    out[i] = (finish, usage and usage["completion_tokens"], error)


def test_hostile_values_fail_only_their_own_request(server):
    http, results = server["http"], {}
    with BridgeClient(server["bridge"]) as client:
        client.connect()
        threads = [threading.Thread(target=_http_victim, args=(http, i, results)) for i in range(3)]
        for t in threads:
            t.start()
        victims = [client.generate(f"Bridge victim {i} says", max_tokens=VICTIM_TOKENS, temperature=0.8, seed=i,
                                   ignore_eos=True) for i in range(3)]
        # The probe's reproduction first: top_k = 2**70 over HTTP while the victims stream.
        status, out = _post(http + "/v1/completions", {"model": "tiny-llama32", "prompt": "x", "top_k": 2**70})
        assert status == 400 and out["error"]["param"] == "top_k" and "top_k" in out["error"]["message"]
        for name, values in HOSTILE.items():
            for value in values:
                body = {"model": "tiny-llama32", "prompt": "hostile", "max_tokens": 4, name: value}
                status, out = _post(http + "/v1/completions", body)
                assert status == 400, (name, value, out)
                assert out["error"]["param"] == name and name in out["error"]["message"], (name, out)
        for name, values in HOSTILE_ON_THE_BRIDGE.items():
            for value in values:
                rid = client.generate("hostile", **{"max_tokens": 4, name: value})
                with pytest.raises(BridgeError) as err:
                    client.wait(rid, timeout_s=60)
                assert err.value.code == "bad_request" and name in str(err.value), (name, value, err.value)
        for rid in victims:
            done = client.wait(rid, timeout_s=300)
            assert (done.finish_reason, done.usage["completion_tokens"]) == ("length", VICTIM_TOKENS)
        for t in threads:
            t.join(timeout=300)
        assert results == {i: ("length", VICTIM_TOKENS, None) for i in range(3)}
        assert client.stats()["kv_free_blocks"] == client.stats()["kv_total_blocks"]


def test_the_table_bounds_every_front_end_alike():
    """The bridge's generate and the engine take exactly the table's range: the top of each range passes,
    one step beyond fails, naming the field."""
    from gllm.bridge import protocol as P
    from gllm.engine.request import GenerationRequest
    for f in BRIDGE_FIELDS:
        if f.kind not in ("int", "float"):
            continue
        top = f.hi
        assert getattr(P.parse_client_message(P.encode({"op": "generate", "id": "a", "prompt": "p",
                                                        f.wire_name: top})), f.wire_name) == top
        beyond = top + 1 if f.kind == "int" else top * 1.5 + 1
        if beyond < 2**64:                         # msgpack cannot carry more
            with pytest.raises(P.ProtocolError, match=f.wire_name):
                P.parse_client_message(P.encode({"op": "generate", "id": "a", "prompt": "p", f.wire_name: beyond}))
        GenerationRequest(prompt="p", **{f.name: top}).sampling_params()
        with pytest.raises(ValueError, match=f.name):
            GenerationRequest(prompt="p", **{f.name: beyond}).sampling_params()
    assert FIELDS_BY_NAME["top_k"].hi == 2**31 - 1

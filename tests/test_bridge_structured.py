"""Structured output over the bridge, against a real `gllm serve --zmq` process on the tiny random model: a
`json_schema` generate (as a map and as JSON text) answers valid JSON in `done.text`, `choice` and `regex`
match, a malformed schema or two constraints at once get `bad_request`, and the server serves on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import jsonschema
import pytest

from gllm.bridge.client import BridgeClient, BridgeError

SCHEMA = {"type": "object", "properties": {
    "action": {"enum": ["open_gate", "refuse"]}, "target": {"type": "string", "maxLength": 10},
    "gold": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["action", "target", "gold"], "additionalProperties": False}


@pytest.fixture(scope="module")
def endpoint(llama32_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "gllm.cli", "serve", "--model", str(llama32_dir),
                             "--zmq", "tcp://127.0.0.1:*", "--max-seq-len", "256", "--cpu-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline, address = time.time() + 120, None
    while address is None and time.time() < deadline:
        line = proc.stdout.readline()
        assert line, "gllm serve exited before listening"
        if line.startswith("gllm bridge listening on "):
            address = line[len("gllm bridge listening on "):].strip()
    yield address
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def test_json_schema_generate_answers_valid_json(endpoint):
    with BridgeClient(endpoint) as client:
        client.connect()
        ids = [client.generate("The guard decides:", max_tokens=80, seed=s, json_schema=schema)
               for s, schema in enumerate([SCHEMA, json.dumps(SCHEMA), SCHEMA, json.dumps(SCHEMA)])]
        for rid in ids:
            done = client.wait(rid, timeout_s=120)
            assert done.finish_reason == "stop"
            jsonschema.validate(json.loads(done.text), SCHEMA)
        choice = client.wait(client.generate("Open?", choice=["yes", "no"], max_tokens=8), timeout_s=60)
        assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
        regex = client.wait(client.generate("Code:", regex="[A-Z]{2}-[0-9]{2}", max_tokens=16), timeout_s=60)
        assert re.fullmatch("[A-Z]{2}-[0-9]{2}", regex.text)


@pytest.mark.parametrize("fields, name", [
    ({"json_schema": {"type": "frobnicate"}}, "json_schema"),
    ({"json_schema": "{\"type\": "}, "json_schema"),
    ({"regex": "[z-a]"}, "regex"),
    ({"grammar": "start: missing_rule"}, "grammar"),
    ({"regex": "a", "choice": ["a"]}, "choice"),
])
def test_a_malformed_constraint_gets_bad_request_and_the_server_serves_on(endpoint, fields, name):
    with BridgeClient(endpoint) as client:
        client.connect()
        rid = client.generate("x", max_tokens=4, **fields)
        with pytest.raises(BridgeError) as err:
            client.wait(rid, timeout_s=60)
        assert err.value.code == "bad_request" and name in str(err.value)
        ok = client.wait(client.generate("Open?", choice=["fine"], max_tokens=4), timeout_s=60)
        assert ok.text == "fine"
        stats = client.stats()
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]

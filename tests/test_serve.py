"""`gllm serve --zmq ... --http ...`: both front ends over one engine, in a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from gllm.bridge.client import BridgeClient


def test_bridge_and_http_share_one_engine(llama32_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "gllm.cli", "serve", "--model", str(llama32_dir),
                             "--zmq", "tcp://127.0.0.1:*", "--http", "127.0.0.1:0", "--max-seq-len", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        endpoints = {}
        deadline = time.time() + 120
        while len(endpoints) < 2 and time.time() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            for kind in ("bridge", "http"):
                prefix = f"gllm {kind} listening on "
                if line.startswith(prefix):
                    endpoints[kind] = line[len(prefix):].strip()
        with BridgeClient(endpoints["bridge"]) as client:
            client.connect()
            rid = client.generate("Hello there", max_tokens=6, temperature=0)
            done = client.wait(rid)
            assert done.finish_reason == "length" and done.usage["completion_tokens"] == 6
            metrics = urllib.request.urlopen(endpoints["http"] + "/metrics", timeout=10).read().decode()
            assert "gllm_bridge_clients_connected 1.0" in metrics
            body = b'{"model": "tiny-llama32", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}'
            req = urllib.request.Request(endpoints["http"] + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            http_text = __import__("json").loads(urllib.request.urlopen(req, timeout=30).read())["choices"][0]["text"]
            assert http_text == done.text          # one engine, same greedy answer through both doors
            assert client.stats()["steps"] >= 12
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0

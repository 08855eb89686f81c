"""`gllm serve --zmq ... --http ...`: both front ends over one engine, in a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from gllm.bridge.client import BridgeClient, BridgeError, Done


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_count_both_front_ends(llama32_dir):
    """One `gllm serve --zmq ... --http ...`: a bridge client and an OpenAI client each complete a generate, a
    bridge generate is refused; /metrics counts both front ends' requests and tokens, the refusal and the
    bridge session, and the dashboard's live view lists requests of both; a game's frame reports show the
    governor's state there too."""
    openai = pytest.importorskip("openai")
    from prometheus_client.parser import text_string_to_metric_families

    zmq_port, http_port = _free_port(), _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GLLM_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "gllm.cli", "serve", "--model", str(llama32_dir),
                             "--zmq", f"tcp://127.0.0.1:{zmq_port}", "--http", f"127.0.0.1:{http_port}",
                             "--max-seq-len", "256", "--cpu-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = set()
        deadline = time.time() + 120
        while len(ready) < 2 and time.time() < deadline:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            ready |= {kind for kind in ("bridge", "http") if line.startswith(f"gllm {kind} listening on ")}
        url = f"http://127.0.0.1:{http_port}"
        with BridgeClient(f"tcp://127.0.0.1:{zmq_port}") as client:
            client.connect()
            done = client.wait(client.generate("Hello there", max_tokens=6, temperature=0, ignore_eos=True))
            assert done.finish_reason == "length" and done.usage["completion_tokens"] == 6
            with pytest.raises(BridgeError) as refused:     # refused at the edge: counted as rejected
                client.wait(client.generate("Hello", max_tokens=6, top_p=5.0))
            assert refused.value.code == "bad_request"

            oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            out = oa.completions.create(model="tiny-llama32", prompt="Hello there", max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
            assert out.usage.completion_tokens == 5

            # A game over its frame target while an NPC talks: the governor's state reaches /metrics and the panel.
            # Paced at 20 tokens/s so that it is still talking when /metrics is read, however fast the machine.
            long_id = client.generate("Once upon a time", max_tokens=200, ignore_eos=True, max_tokens_per_s=20)
            end = time.monotonic() + 1.5
            events = []
            while time.monotonic() < end:
                client.frame(40.0, 16.6, max_ms=45.0, frames=15, over=15)
                events += client.poll(250)
            text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
            live = json.loads(urllib.request.urlopen(url + "/v1/gllm/live", timeout=10).read())
            assert not [ev for ev in events if isinstance(ev, Done) and ev.id == long_id]
            client.cancel(long_id)
            assert client.wait(long_id).finish_reason == "cancelled"
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}

    def m(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)
    assert m("gllm_requests_total", front_end="bridge", outcome="length") == 1
    assert m("gllm_requests_total", front_end="http", outcome="length") == 1
    assert m("gllm_requests_total", front_end="bridge", outcome="rejected") == 1
    assert m("gllm_requests_rejected_total", front_end="bridge", reason="bad_request") == 1
    assert m("gllm_completion_tokens_total", front_end="bridge") == 6
    assert m("gllm_completion_tokens_total", front_end="http") == 5
    assert m("gllm_prompt_tokens_total", front_end="bridge") > 0 and m("gllm_prompt_tokens_total", front_end="http") > 0
    assert m("gllm_time_to_first_token_seconds_count") >= 2
    assert m("gllm_governor_duty_ratio") < 1 and m("gllm_governor_frames_over_ratio") == 1.0
    assert m("gllm_governor_paused_seconds_total") > 0 and m("gllm_engine_step_p50_seconds") > 0
    assert live["frame"]["duty"] != "100 %" and live["frame"]["frames over 1.1x target"] == "100.0 %"
    assert m("gllm_bridge_clients_connected") == 1
    assert m("gllm_engine_step_seconds_count") >= 10
    assert {r["front_end"] for r in live["recent"]} == {"bridge", "http"}
    assert live["bridge_clients"] == 1

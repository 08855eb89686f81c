"""The OpenAI-compatible HTTP server: the official `openai` client against a real `python -m gllm.http`
subprocess on the tiny model, raw HTTP for every error path, a mid-stream disconnect, /metrics parsed
with prometheus_client, and an in-process `HttpFrontEnd` for overload (503) and lifecycle."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402

API_KEY = "test-key-123"
MODEL_ID = "tiny-llama32"
MAX_SEQ_LEN = 256
CHAT = [{"role": "system", "content": "You are a blacksmith in a small village."},
        {"role": "user", "content": "What do you sell?"}]
PROMPT = "The dragon landed on the tower and"


# ----------------------------------------------------------------------------------------- helpers
def start_server(model_dir: Path, log_path: Path, *extra: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("GLLM_API_KEY", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gllm.http", "--model", str(model_dir), "--http", "127.0.0.1:0",
                             "--cpu-threads", "1", *extra], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            break
        if proc.poll() is not None:
            break
    sel.close()
    if not line.startswith("gllm http listening on "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start (line {line!r}); stderr:\n{log_path.read_text()}")
    return proc, line.strip().rsplit(" ", 1)[1]


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


class Http:
    """Raw HTTP against the server (stdlib only)."""

    def __init__(self, url: str, key: str | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.key = parts.hostname, parts.port, key

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=60)

    def headers(self, key: str | None | bool = True, extra: dict | None = None) -> dict:
        h = {"Content-Type": "application/json"}
        k = self.key if key is True else key
        if k:
            h["Authorization"] = f"Bearer {k}"
        h.update(extra or {})
        return h

    def request(self, method: str, path: str, body=None, key: str | None | bool = True,
                raw: bytes | None = None) -> tuple[int, dict, bytes]:
        c = self.conn()
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        c.request(method, path, body=data, headers=self.headers(key))
        r = c.getresponse()
        payload = r.read()
        c.close()
        return r.status, dict(r.getheaders()), payload

    def json(self, method: str, path: str, body=None, key: str | None | bool = True) -> tuple[int, dict]:
        status, _, payload = self.request(method, path, body, key)
        return status, json.loads(payload)

    def open_stream(self, path: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        c = self.conn()
        c.request("POST", path, body=json.dumps(dict(body, stream=True)).encode(), headers=self.headers())
        r = c.getresponse()
        assert r.status == 200, r.read()
        assert r.getheader("content-type").startswith("text/event-stream")
        return c, r

    def metrics(self) -> dict[tuple[str, tuple], float]:
        status, _, payload = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(payload.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def sse_events(resp: http.client.HTTPResponse, limit: int | None = None):
    """Yield decoded `data:` payloads (the string "[DONE]" as is)."""
    n = 0
    while True:
        line = resp.readline()
        if not line:
            return
        line = line.decode().rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield data if data == "[DONE]" else json.loads(data)
        n += 1
        if limit is not None and n >= limit:
            return


def m(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def server(llama32_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("http") / "server.log"
    # --result-cache-entries 0: repeated requests are computed again (tests/test_http_npc_memory.py tests the cache)
    proc, url = start_server(llama32_dir, log, "--result-cache-entries", "0", "--api-key", API_KEY,
                             "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch-size", "4", "--max-body-mb", "0.25")
    yield url
    code = stop_server(proc)
    assert code == 0, f"server exited {code}; stderr:\n{log.read_text()}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def raw(server):
    return Http(server, API_KEY)


@pytest.fixture(scope="module")
def ref_engine(llama32_dir):
    engine = LLMEngine(llama32_dir, GeneratorParams(max_seq_len=MAX_SEQ_LEN, max_batch_size=4, cpu_threads=1),
                       device="cpu")
    yield engine
    engine.close()


def greedy(engine: LLMEngine, max_tokens: int, logprobs: int | None = None, **fields):
    return engine.generate(GenerationRequest(max_new_tokens=max_tokens, temperature=0.0, logprobs=logprobs,
                                             **fields))[0]


# ----------------------------------------------------------------------------------------- openai client
def test_models(client):
    models = client.models.list()
    assert [x.id for x in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_greedy_equals_in_process_engine(client, ref_engine):
    ref = greedy(ref_engine, 12, messages=CHAT)
    out = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.text and ref.text
    assert choice.finish_reason == ref.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens
    assert out.usage.completion_tokens == len(ref.tokens) == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.id.startswith("chatcmpl-") and out.model == MODEL_ID and out.object == "chat.completion"


def test_chat_stream_with_usage_and_logprobs(client, ref_engine):
    ref = greedy(ref_engine, 10, logprobs=3, messages=CHAT)
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            logprobs=True, top_logprobs=3)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(lps) == len(ref.tokens) == 10
    for got, want in zip(lps, ref.logprobs):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)
        assert len(got.top_logprobs) == 3
        assert got.top_logprobs[0].logprob == pytest.approx(got.logprob, abs=1e-6)  # greedy: the top one
    assert bytes(b for lp in lps for b in lp.bytes).decode("utf-8", errors="replace") == text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == ref.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs_not_streamed(client, ref_engine):
    ref = greedy(ref_engine, 6, logprobs=2, messages=CHAT)
    out = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [round(c.logprob, 4) for c in content] == [round(x.logprob, 4) for x in ref.logprobs]
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert out.choices[0].message.content == ref.text


def test_completions_greedy_stream_and_not(client, ref_engine):
    ref = greedy(ref_engine, 8, logprobs=2, prompt=PROMPT)
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.usage.prompt_tokens and out.usage.completion_tokens == 8
    assert choice.logprobs.token_logprobs == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-4)
    assert len(choice.logprobs.tokens) == 8 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert choice.logprobs.text_offset[0] == 0

    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 8


def test_stop_seed_and_gllm_extras(client, ref_engine):
    ref = greedy(ref_engine, 16, messages=CHAT).text
    cut = next(i for i in range(3, len(ref)) if ref[i].strip())  # a stop string starting mid-text
    stop = ref[cut:cut + 2]
    out = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == ref[:ref.index(stop)]

    def sampled(seed: int) -> str:
        return client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=1.0,
                                              seed=seed).choices[0].message.content
    assert sampled(7) == sampled(7)
    # gllm's extras ride in extra_body: top_k=1 makes sampling greedy whatever the temperature.
    out = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=16, temperature=1.5,
                                         extra_body={"top_k": 1, "min_p": 0.05, "priority": 3})
    assert out.choices[0].message.content == ref
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=CHAT, extra_body={"top_k": -1})


def test_openai_client_errors(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        good.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        good.chat.completions.create(model=MODEL_ID, messages=CHAT, n=2)
    assert err.value.param == "n"


# ----------------------------------------------------------------------------------------- raw HTTP errors
def _msg(content="hi"):
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"model": MODEL_ID}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "n": 3}, "n"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "temperature": 5.5}, "temperature"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "max_completion_tokens": -5},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "stop": [1, 2]}, "stop"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "stop": ["x"] * 17}, "stop"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "presence_penalty": 9}, "presence_penalty"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "tools": [{"type": "function"}]}, "tools"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "response_format": {"type": "xml"}},
     "response_format"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "priority": 1.5}, "priority"),
    ("/v1/completions", {"model": MODEL_ID}, "prompt"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [1, 999999999]}, "prompt"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "x", "best_of": 2}, "best_of"),
])
def test_invalid_params_are_400(raw, path, body, param):
    status, out = raw.json("POST", path, body)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_error_statuses(raw):
    # 401: no key, wrong key, wrong scheme; /health needs none
    for key in (None, "nope"):
        status, out = raw.json("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": _msg()}, key=key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
    status, headers, _ = raw.request("GET", "/v1/models", key=None)
    assert status == 401 and headers.get("www-authenticate") == "Bearer"
    assert raw.request("GET", "/metrics", key=None)[0] == 401
    status, out = raw.json("GET", "/health", key=None)
    assert status == 200 and out["status"] == "ok"
    # 404: unknown route, unknown model
    status, out = raw.json("GET", "/v2/everything")
    assert status == 404 and out["error"]["type"] == "invalid_request_error"
    assert "/v2/everything" in out["error"]["message"]
    status, out = raw.json("POST", "/v1/completions", {"model": "llama-9000", "prompt": "x"})
    assert status == 404 and out["error"]["code"] == "model_not_found" and out["error"]["param"] == "model"
    # 405: wrong method, still OpenAI's shape
    status, out = raw.json("GET", "/v1/chat/completions")
    assert status == 405 and "error" in out
    # 400: not JSON, not an object
    status, _, payload = raw.request("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and json.loads(payload)["error"]["code"] == "invalid_json"
    status, out = raw.json("POST", "/v1/chat/completions", [1, 2])
    assert status == 400
    # too long for the context: 400 context_length_exceeded; too big a body: 413
    long_prompt = " ".join(["dragon"] * (MAX_SEQ_LEN + 20))
    status, out = raw.json("POST", "/v1/completions", {"model": MODEL_ID, "prompt": long_prompt, "max_tokens": 4})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out
    status, out = raw.json("POST", "/v1/chat/completions",
                           {"model": MODEL_ID, "messages": _msg("x" * 300_000), "max_tokens": 1})
    assert status == 413 and out["error"]["code"] == "request_too_large"


def test_disconnect_mid_stream_cancels_and_frees_blocks(raw):
    before = raw.metrics()
    body = {"model": MODEL_ID, "messages": _msg("Tell me a long story"), "max_tokens": 200, "ignore_eos": True,
            "temperature": 0}
    conn, resp = raw.open_stream("/v1/chat/completions", body)
    got = list(sse_events(resp, limit=4))          # the role chunk and some text
    assert len(got) == 4 and all(isinstance(g, dict) for g in got)
    during = raw.metrics()
    assert m(during, "gllm_kv_blocks_used") > 0 and m(during, "gllm_requests_running") == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    def settled():
        now = raw.metrics()
        return now if m(now, "gllm_requests_total", front_end="http", outcome="cancelled") > \
            m(before, "gllm_requests_total", front_end="http", outcome="cancelled") else None
    after = wait_for(settled, what="the request to be cancelled")
    assert m(after, "gllm_kv_blocks_used") == 0
    assert m(after, "gllm_kv_blocks_free") == m(after, "gllm_kv_blocks_total") > 0
    assert m(after, "gllm_requests_running") == 0 and m(after, "gllm_requests_waiting") == 0
    generated = m(after, "gllm_completion_tokens_total", front_end="http") - \
        m(before, "gllm_completion_tokens_total", front_end="http")
    assert 0 < generated < 200                     # it stopped early, it did not run to max_tokens
    status, live = raw.json("GET", "/v1/gllm/live")
    assert status == 200 and live["requests"] == [] and live["recent"][0]["outcome"] == "cancelled"


def test_metrics_counters_move(raw, client):
    before = raw.metrics()
    lore = "The kingdom of Eldoria sits between two rivers and three mountains; its smiths are famous. " * 3
    for _ in range(2):                               # the same long prompt twice: the second hits the prefix cache
        client.completions.create(model=MODEL_ID, prompt=lore, max_tokens=5, temperature=0)
    status, _ = raw.json("POST", "/v1/chat/completions", {"model": MODEL_ID, "messages": _msg(), "n": 9})
    assert status == 400
    after = raw.metrics()

    def delta(name, **labels):
        return m(after, name, **labels) - m(before, name, **labels)
    assert delta("gllm_requests_total", front_end="http", outcome="length") == 2
    assert delta("gllm_requests_total", front_end="http", outcome="rejected") == 1
    assert delta("gllm_requests_rejected_total", front_end="http", reason="bad_request") == 1
    assert delta("gllm_completion_tokens_total", front_end="http") == 10
    assert delta("gllm_prompt_tokens_total", front_end="http") > 40
    assert delta("gllm_prompt_tokens_cached_total", front_end="http") >= 16
    assert delta("gllm_time_to_first_token_seconds_count") == 2
    assert delta("gllm_inter_token_latency_seconds_count") == 8       # 4 gaps per 5-token request
    assert delta("gllm_request_duration_seconds_count") == 2
    assert delta("gllm_engine_step_seconds_count") >= 8    # 5 steps each; the last may be observed after the reply
    assert delta("gllm_prefix_cache_hits_total") >= 1
    assert 0 < m(after, "gllm_prefix_cache_hit_rate") <= 1
    assert m(after, "gllm_bridge_clients_connected") == 0
    assert m(after, "gllm_kv_blocks_total") == m(after, "gllm_kv_blocks_free") + m(after, "gllm_kv_blocks_used")
    assert ("gllm_model_info", (("device", "cpu"), ("model", m_source(raw)))) in after


def m_source(raw: Http) -> str:
    return raw.json("GET", "/v1/gllm/live")[1]["model_source"]


def test_live_json_for_the_dashboard(raw):
    status, headers, page = raw.request("GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and b"/v1/gllm/live" in page
    status, live = raw.json("GET", "/v1/gllm/live")
    assert status == 200
    assert live["model"] == MODEL_ID and live["device"] == "cpu"
    assert live["engine"]["max_seq_len"] == MAX_SEQ_LEN and live["kv"]["total"] > 0
    assert live["steps"]["count"] > 0 and len(live["steps"]["buckets"]) == 13
    assert len(live["throughput"]["generated_per_s_series"]) == 60
    assert raw.request("GET", "/v1/gllm/live", key=None)[0] == 401


def test_refuses_public_address_without_key(llama32_dir):
    env = dict(os.environ)
    env.pop("GLLM_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "gllm.http", "--model", str(llama32_dir), "--http", "0.0.0.0:0"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "not loopback" in proc.stderr and "--api-key" in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------------------------------------- in process
def test_in_process_front_end_overload_and_disconnects(llama32_dir):
    from gllm.http import HttpFrontEnd, Metrics
    from gllm.http.server import is_loopback_host, parse_address

    assert parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_address("[::1]:8080") == ("::1", 8080) and parse_address(":9") == ("127.0.0.1", 9)
    assert is_loopback_host("localhost") and not is_loopback_host("0.0.0.0")
    engine = LLMEngine(llama32_dir, GeneratorParams(max_seq_len=1024, max_batch_size=1, max_waiting_requests=1,
                                                    cpu_threads=1), device="cpu")
    try:
        with pytest.raises(ValueError, match="not loopback"):
            HttpFrontEnd(engine, "0.0.0.0", 0)
        metrics = Metrics(engine)
        front = HttpFrontEnd(engine, "127.0.0.1", 0, metrics=metrics)
        url = front.start()
        try:
            raw = Http(url)
            body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True}
            streams = [raw.open_stream("/v1/completions", body) for _ in range(2)]   # one running, one waiting
            status, headers, payload = raw.request("POST", "/v1/completions", dict(body, max_tokens=1))
            err = json.loads(payload)["error"]
            assert status == 503 and err["code"] == "overloaded" and err["type"] == "server_error"
            assert headers.get("retry-after") == "1"
            for c, _ in streams:                                  # both clients leave: both requests cancelled
                c.sock.shutdown(socket.SHUT_RDWR)
                c.close()
            wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, what="drain")
            assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]

            # a non-streaming client that leaves is noticed too
            c = raw.conn()
            c.request("POST", "/v1/completions", body=json.dumps(body).encode(), headers=raw.headers())
            wait_for(lambda: engine.stats()["running"] == 1, what="the request to run")
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
            wait_for(lambda: engine.stats()["running"] == 0, what="the abandoned request to end")
            assert engine.stats()["kv_free_blocks"] == engine.stats()["kv_total_blocks"]
            families = {f.name: f for f in text_string_to_metric_families(metrics.exposition()[0].decode())}
            outcomes = {s.labels["outcome"]: s.value for s in families["gllm_requests"].samples
                        if s.name == "gllm_requests_total"}
            assert outcomes["cancelled"] == 3 and outcomes["rejected"] == 1
            metrics.set_bridge_clients(2)
            assert Http(url).json("GET", "/v1/gllm/live")[1]["bridge_clients"] == 2
            # a request in flight when the server stops ends too (cancelled with the stream)
            conn, resp = raw.open_stream("/v1/completions", body)
            next(sse_events(resp, limit=1))
        finally:
            front.stop()
        rest = list(sse_events(resp))                  # the open stream was ended, not cut
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "cancelled"
        wait_for(lambda: engine.stats()["running"] == 0, what="stop to cancel the open stream")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", front.port), timeout=2)
    finally:
        engine.close()

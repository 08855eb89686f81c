"""NPC memory over HTTP, against a real `python -m gllm.http` subprocess: `/v1/embeddings` through the official
`openai` client (shapes, normalisation, order, usage, the same vector whatever else is in the batch, base64),
the result cache's `usage.cached` extension and its /metrics counters."""

from __future__ import annotations

import base64
import math
import struct

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

from test_http import API_KEY, Http, m, start_server, stop_server  # noqa: E402

from gllm.engine import GeneratorParams, LLMEngine  # noqa: E402

MAX_SEQ_LEN = 256
LINES = ["The dragon sleeps under the northern mountain.", "Brann the guard keeps the river gate.",
         "a", "Prices at the smithy went up after the war. " * 3]


@pytest.fixture(scope="module")
def server(llama32_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("http-npc") / "server.log"
    proc, url = start_server(llama32_dir, log, "--api-key", API_KEY, "--max-seq-len", str(MAX_SEQ_LEN),
                             "--max-batch-size", "4")
    yield url
    assert stop_server(proc) == 0, log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref_engine(llama32_dir):
    with LLMEngine(llama32_dir, GeneratorParams(max_seq_len=MAX_SEQ_LEN, max_batch_size=4, cpu_threads=1),
                   device="cpu") as engine:
        yield engine


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_embeddings_shapes_normalisation_order_and_usage(client, ref_engine):
    out = client.embeddings.create(model="tiny-llama32", input=LINES, encoding_format="float")
    assert [d.index for d in out.data] == list(range(len(LINES)))
    hidden = ref_engine.model_config.hidden_size
    for d in out.data:
        assert len(d.embedding) == hidden and abs(norm(d.embedding) - 1) < 1e-5
    tokens = sum(len(ref_engine.tokenizer.encode(t, special_tokens_as_text=True)) for t in LINES)
    assert out.usage.prompt_tokens == out.usage.total_tokens == tokens
    # The in-process engine gives the same vectors (same model, same dtype).
    expected = ref_engine.embed(LINES).vectors
    for got, want in zip(out.data, expected):
        assert max(abs(a - b) for a, b in zip(got.embedding, want)) < 1e-6
    # Distinct texts, distinct vectors.
    assert len({tuple(d.embedding) for d in out.data}) == len(LINES)


def test_identical_inputs_give_identical_vectors_across_batch_compositions(client):
    alone = [client.embeddings.create(model="tiny-llama32", input=t, encoding_format="float").data[0].embedding
             for t in LINES]
    reordered = client.embeddings.create(model="tiny-llama32", input=LINES[::-1] + LINES[:1],
                                         encoding_format="float").data
    assert [d.embedding for d in reordered] == alone[::-1] + alone[:1]
    ids = client.embeddings.create(model="tiny-llama32", input=[[1, 2, 3, 4], [5, 6]], encoding_format="float")
    assert len(ids.data) == 2 and ids.usage.prompt_tokens == 6


def test_base64_encoding_and_the_last_token_pooling(server, client):
    raw = Http(server, API_KEY)
    status, body = raw.json("POST", "/v1/embeddings", {"input": LINES[:2], "encoding_format": "base64"})
    assert status == 200
    floats = client.embeddings.create(model="tiny-llama32", input=LINES[:2], encoding_format="float").data
    for item, ref in zip(body["data"], floats):
        data = base64.b64decode(item["embedding"])
        assert list(struct.unpack(f"<{len(data) // 4}f", data)) == pytest.approx(ref.embedding, abs=1e-7)
    # The openai client's default asks for base64 and decodes it itself.
    assert client.embeddings.create(model="tiny-llama32", input=LINES[0]).data[0].embedding == \
        pytest.approx(floats[0].embedding, abs=1e-7)
    status, last = raw.json("POST", "/v1/embeddings", {"input": LINES[0], "pooling": "last"})
    assert status == 200 and last["data"][0]["embedding"] != floats[0].embedding
    assert abs(norm(last["data"][0]["embedding"]) - 1) < 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"), ({"input": [None]}, "input"), ({"input": "x", "encoding_format": "hex"},
                                                            "encoding_format"),
    ({"input": "x", "pooling": "max"}, "pooling"), ({}, "input"), ({"input": "x", "dimensions": 8}, "dimensions"),
    ({"input": [[1, 2], [10**9]]}, "input"), ({"input": "word " * 2000}, "input"),
])
def test_bad_embedding_requests_are_400_naming_the_field(server, client, body, param):
    raw = Http(server, API_KEY)
    status, answer = raw.json("POST", "/v1/embeddings", body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert client.embeddings.create(model="tiny-llama32", input="still serving").data   # the server serves on


def test_result_cache_hit_is_marked_and_counted(server, client):
    raw = Http(server, API_KEY)
    before = raw.metrics()
    ask = dict(model="tiny-llama32", prompt="The bard sang of", max_tokens=8, temperature=0)
    first = client.completions.create(**ask)
    second = client.completions.create(**ask)
    assert second.choices[0].text == first.choices[0].text
    assert not (first.usage.model_extra or {}).get("cached")
    assert second.usage.model_extra["cached"] is True
    after = raw.metrics()
    assert m(after, "gllm_result_cache_hits_total") - m(before, "gllm_result_cache_hits_total") == 1
    assert m(after, "gllm_result_cache_misses_total") - m(before, "gllm_result_cache_misses_total") == 1
    assert m(after, "gllm_result_cache_entries") >= 1
    opted_out = client.completions.create(**ask, extra_body={"cache_result": False})
    assert not (opted_out.usage.model_extra or {}).get("cached")

"""The prompt-result cache (gllm.engine.result_cache, in LLMEngine): deterministic repeats are answered at once
and marked cached; any changed field misses; unseeded sampling never hits; LRU bounds hold."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.engine.request import GenerationResult, Timings, Usage
from gllm.engine.result_cache import ResultCache, result_bytes
from gllm.request_fields import SAMPLING_FIELDS

PROMPT = "Guard: Halt! Who goes there?\nPlayer:"


def engine(folder, **kw) -> LLMEngine:
    params = dict(block_size=16, max_batch_size=4, max_seq_len=256, cpu_threads=1, dtype="float32",
                  overlap_steps=False)
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device="cpu")


def request(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.fixture(scope="module")
def eng(llama32_dir):
    with engine(llama32_dir) as e:
        yield e


def run(eng: LLMEngine, req: GenerationRequest) -> GenerationResult:
    return eng.generate(dataclasses.replace(req))[0]


def test_a_deterministic_repeat_is_a_hit_with_identical_output(eng):
    for req in (request(logprobs=3), request(temperature=0.9, top_p=0.9, seed=11, logprobs=2)):
        before = eng.stats()
        first = run(eng, req)
        second = run(eng, req)
        after = eng.stats()
        assert not first.usage.cached and second.usage.cached
        assert (second.text, second.tokens, second.logprobs, second.finish_reason) == \
            (first.text, first.tokens, first.logprobs, first.finish_reason)
        assert second.usage.prompt_tokens == first.usage.prompt_tokens == second.usage.cached_tokens
        assert second.request_id != first.request_id
        assert after["result_cache_hits"] - before["result_cache_hits"] == 1
        assert after["result_cache_misses"] - before["result_cache_misses"] == 1
        assert after["steps"] == before["steps"] + first.usage.completion_tokens   # the hit ran no step


def test_a_hit_streams_one_event_with_every_token_then_the_final_one(eng):
    req = request(max_new_tokens=9)
    run(eng, req)

    async def collect():
        return [ev async for ev in eng.stream(dataclasses.replace(req))]

    events = asyncio.run(collect())
    assert len(events) == 2 and events[1].finished and events[1].result.usage.cached
    assert events[0].text == events[1].result.text and events[0].token_ids == events[1].result.tokens
    assert events[1].text == "" and events[1].token_ids == []


def changed_values() -> dict[str, object]:
    """One changed value for every field that can change the output."""
    return {"max_new_tokens": 11, "temperature": 0.7, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 4,
            "stop": ["zzz"], "logprobs": 1, "repetition_penalty": 1.3, "presence_penalty": 0.5,
            "frequency_penalty": 0.5, "ignore_eos": False, "stop_token_ids": [5],
            "json_schema": {"type": "string"}, "regex": "a+", "grammar": 'start: "a"', "choice": ["yes", "no"]}


def test_any_changed_field_misses(eng):
    base = request(seed=3)
    assert {f.name for f in SAMPLING_FIELDS} == set(changed_values())   # a new field needs a line here
    run(eng, base)
    assert run(eng, base).usage.cached
    for name, value in [*changed_values().items(), ("prompt", PROMPT + " I")]:
        changed = dataclasses.replace(base, **{name: value})
        assert not run(eng, changed).usage.cached, name
    # Fields that do not change the output do not change the key.
    assert run(eng, dataclasses.replace(base, priority=5, ttft_deadline_ms=1000.0)).usage.cached


def test_sampling_without_a_seed_paced_replies_and_the_opt_out_never_hit(eng):
    before = eng.stats()
    for req in (request(temperature=0.8), request(cache_result=False)):
        assert not any(run(eng, req).usage.cached for _ in range(2))
    after = eng.stats()
    assert after["result_cache_hits"] == before["result_cache_hits"]
    assert after["result_cache_misses"] == before["result_cache_misses"]   # never even looked up
    assert not any(run(eng, request(max_new_tokens=6, max_tokens_per_s=500.0)).usage.cached for _ in range(2))
    # The opt-out neither reads nor writes: the same request with the cache on misses first.
    assert not run(eng, request(cache_result=True, max_new_tokens=7)).usage.cached
    assert run(eng, request(max_new_tokens=7)).usage.cached


def test_cancelled_and_failed_results_are_not_stored(eng):
    def broken(token_ids, logits):
        raise RuntimeError("no")

    req = request(max_new_tokens=5, stop=["\x00never"], logits_processor=None, seed=99, temperature=0.5)
    handle = eng.submit(dataclasses.replace(req, max_new_tokens=200, max_tokens_per_s=5))
    eng.cancel(handle.request_id)
    assert handle.result(timeout=60).finish_reason == "cancelled"
    assert not run(eng, dataclasses.replace(req, max_new_tokens=200)).usage.cached
    failing = run(eng, request(logits_processor=broken))   # a callback: never deterministic, never cached
    assert failing.finish_reason == "error"
    assert not run(eng, request(logits_processor=broken)).usage.cached


def test_lru_bounds_entries(llama32_dir):
    with engine(llama32_dir, result_cache_entries=2) as small:
        reqs = [request(max_new_tokens=n) for n in (3, 4, 5)]
        for r in reqs:
            run(small, r)
        assert small.stats()["result_cache_entries"] == 2
        assert not run(small, reqs[0]).usage.cached            # the oldest went
        assert run(small, reqs[2]).usage.cached
        assert small.stats()["kv_free_blocks"] == small.stats()["kv_total_blocks"]
    with engine(llama32_dir, result_cache_entries=0) as off:
        run(off, reqs[0])
        assert not run(off, reqs[0]).usage.cached
        assert off.stats()["result_cache_misses"] == 0


def fake(n: int, text: str = "x") -> GenerationResult:
    return GenerationResult(f"r{n}", text, list(range(n)), "length", Usage(3, n), Timings(0, 0, 0))


def test_lru_bounds_bytes_and_skips_what_does_not_fit():
    one = result_bytes(fake(10))
    cache = ResultCache(max_entries=100, max_bytes=3 * one)
    for i in range(5):
        cache.put(f"k{i}", fake(10))
    assert len(cache) == 3 and cache.stats.bytes <= 3 * one and cache.stats.evictions == 2
    assert cache.get("k0") is None and cache.get("k4") is not None
    cache.get("k2")                       # now the most recent: k3 goes next
    cache.put("k5", fake(10))
    assert cache.get("k3") is None and cache.get("k2") is not None
    cache.put("huge", fake(10, "y" * (4 * one)))
    assert cache.get("huge") is None and len(cache) == 3
    cache.put("err", dataclasses.replace(fake(1), finish_reason="error", error="boom"))
    assert cache.get("err") is None
    stored = cache.get("k5")
    stored.tokens.append(99)               # a hit is a copy: the stored entry stays as it was
    assert cache.get("k5").tokens == list(range(10))

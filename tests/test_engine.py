"""gllm.engine end to end on the tiny fixture models, against transformers and against itself."""

from __future__ import annotations

import asyncio
import copy
import os
import time

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

from helpers import hf_greedy, hf_logits

PROMPTS = [
    "Hello there, how are you doing today?",
    "The blacksmith looked up from the anvil and said",
    "a",
    "Once upon a time in a land far away, there lived a dragon who loved to read books about knights.",
    "1, 2, 3, 4, 5,",
    "Guard: Halt! Who goes there?\nPlayer:",
    "🐉 火龙 says:",
    "The quick brown fox jumps over the lazy dog. " * 4,
]


# GLLM_TEST_DEVICE=cuda runs this whole file on the GPU (float32, both the graph and eager paths).
DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")
# Against transformers on the CPU: 1e-4 on the CPU; on CUDA (TF32 off) reductions differ more.
LOGIT_TOLERANCE = 1e-4 if DEVICE == "cpu" else 1e-3


# Every test runs twice: steps in lock-step, and overlapped (step N's text is processed while step N+1 runs,
# the default on CUDA). The module-scoped fixture below sets which one `engine()` builds.
MODE = {"overlap_steps": False}


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "overlap"], autouse=True)
def overlap_mode(request):
    MODE["overlap_steps"] = request.param
    yield request.param
    MODE["overlap_steps"] = False


def engine(folder, **kw) -> LLMEngine:
    # result_cache_entries=0: these tests compare what the engine computes; the result cache would answer repeats.
    params = dict(block_size=16, max_batch_size=8, max_seq_len=512, cpu_threads=2, dtype="float32",
                  overlap_steps=MODE["overlap_steps"], result_cache_entries=0)
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device=DEVICE)


def greedy(prompt, n=32, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=n, temperature=0, ignore_eos=True, **kw)


def wait_steps(eng: LLMEngine, n: int) -> None:
    target = eng.num_steps + n
    while eng.num_steps < target:
        time.sleep(0.001)


@pytest.fixture(scope="module")
def eng32(llama32_dir, overlap_mode):
    with engine(llama32_dir) as e:
        yield e


@pytest.mark.parametrize("model", ["llama32", "llama31"])
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_greedy_matches_transformers(model, block_size, llama32_dir, llama31_dir):
    folder = {"llama32": llama32_dir, "llama31": llama31_dir}[model]
    prompts = PROMPTS[:3]
    with engine(folder, block_size=block_size) as eng:
        results = eng.generate([greedy(p) for p in prompts])
        for prompt, result in zip(prompts, results):
            ids = eng.tokenizer.encode(prompt)
            assert result.tokens == hf_greedy(folder, ids, 32)
            assert result.finish_reason == "length" and result.usage.completion_tokens == 32
            assert result.text == eng.tokenizer.decode(result.tokens)


def test_staggered_batch_equals_each_request_alone(llama31_dir):
    # A small step budget so long prompts are chunked and mixed with running decodes.
    with engine(llama31_dir, max_step_tokens=24, block_size=8) as eng:
        alone = [eng.generate([greedy(p, n=20 + 3 * i)])[0].tokens for i, p in enumerate(PROMPTS)]
        handles = []
        for i, p in enumerate(PROMPTS):
            handles.append(eng.submit(greedy(p, n=20 + 3 * i)))
            wait_steps(eng, 1 + i % 3)
        together = [h.result(timeout=60).tokens for h in handles]
        assert together == alone
        assert len({tuple(t) for t in alone}) == len(PROMPTS)    # the fixture really distinguishes prompts
        assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]


def test_prefix_caching_hits_and_same_output(llama32_dir):
    lore = ("World lore: the kingdom of Eldmoor sits between two rivers. Dragons sleep in the northern "
            "mountains and the guild of smiths forges their scales into armour. ")
    first, second = lore + "Guard, what do you see?", lore + "Smith, what are you making today?"
    with engine(llama32_dir, block_size=8) as cached:
        assert len(cached.tokenizer.encode(lore)) >= 3 * 8
        cached.generate([greedy(first)])
        before = cached.stats()["prefix_cache_hits"]
        hit = cached.generate([greedy(second)])[0]
        assert cached.stats()["prefix_cache_hits"] - before >= 3
        assert hit.usage.cached_tokens >= 24
    with engine(llama32_dir, block_size=8, enable_prefix_caching=False) as plain:
        miss = plain.generate([greedy(second)])[0]
        assert plain.stats()["prefix_cache_hits"] == 0 and miss.usage.cached_tokens == 0
    assert hit.tokens == miss.tokens


def test_preemption_keeps_greedy_output_and_frees_every_block(llama31_dir):
    requests = [greedy(p, n=40) for p in PROMPTS[:6]]
    with engine(llama31_dir, block_size=4) as big:
        expected = [r.tokens for r in big.generate(requests)]
    # 32 blocks of 4 tokens: the six requests need ~90 blocks at their longest.
    with engine(llama31_dir, block_size=4, kv_cache_tokens=128) as small:
        results = small.generate([greedy(p, n=40) for p in PROMPTS[:6]])
        assert [r.tokens for r in results] == expected
        assert sum(r.num_preemptions for r in results) > 0
        stats = small.stats()
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"] == 32
        assert stats["running"] == stats["waiting"] == 0


def test_seed_reproducible_alone_and_in_a_busy_batch(eng32):
    def sampled(seed):
        return GenerationRequest(prompt=PROMPTS[1], max_new_tokens=24, temperature=1.3, top_p=0.95,
                                 seed=seed, ignore_eos=True)
    alone = eng32.generate([sampled(11)])[0].text
    busy = [GenerationRequest(prompt=p, max_new_tokens=30, temperature=0.9, ignore_eos=True) for p in PROMPTS]
    results = eng32.generate(busy[:4] + [sampled(11)] + busy[4:])
    assert results[4].text == alone
    others = {eng32.generate([sampled(s)])[0].text for s in (12, 13, 14)}
    assert alone not in others and len(others) > 1


def test_logprobs_match_transformers_log_softmax(eng32, llama32_dir):
    for req in (greedy(PROMPTS[0], n=12, logprobs=5),
                GenerationRequest(prompt=PROMPTS[1], max_new_tokens=12, temperature=1.0, seed=3, logprobs=3,
                                  ignore_eos=True)):
        result = eng32.generate([req])[0]
        ids = eng32.tokenizer.encode(req.prompt)
        ref = torch.log_softmax(hf_logits(llama32_dir, ids + result.tokens), dim=-1)[len(ids) - 1:-1]
        assert len(result.logprobs) == 12
        for step, lp in enumerate(result.logprobs):
            assert lp.token_id == result.tokens[step]
            assert abs(lp.logprob - ref[step, lp.token_id].item()) < LOGIT_TOLERANCE
            top_ids = [t for t, _ in lp.top]
            assert len(top_ids) == req.logprobs
            assert top_ids == ref[step].topk(req.logprobs).indices.tolist()
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True)


def test_eos_token_ends_with_stop(eng32):
    assert {128001, 128009} <= eng32.eos_token_ids
    eot = 128009

    def force_eot_at_step_3(token_ids, logits):
        if len(token_ids) - prompt_len == 3:
            logits = logits.clone()
            logits[eot] = logits.max() + 10
        return logits

    prompt_len = len(eng32.tokenizer.encode(PROMPTS[0]))
    req = GenerationRequest(prompt=PROMPTS[0], max_new_tokens=20, temperature=0, logits_processor=force_eot_at_step_3)
    result = eng32.generate([req])[0]
    assert result.finish_reason == "stop" and result.tokens[-1] == eot and len(result.tokens) == 4
    assert "<|eot_id|>" not in result.text
    ignored = eng32.generate([GenerationRequest(prompt=PROMPTS[0], max_new_tokens=6, temperature=0, ignore_eos=True,
                                                logits_processor=force_eot_at_step_3)])[0]
    assert ignored.finish_reason == "length" and len(ignored.tokens) == 6


def test_stop_strings_are_excluded_and_never_streamed(eng32):
    full_result = eng32.generate([greedy(PROMPTS[3], n=40)])[0]
    full = full_result.text
    stop = full[12:16]
    assert len(stop.strip()) > 0
    events = []

    async def collect():
        async for event in eng32.stream(greedy(PROMPTS[3], n=40, stop=[stop, "never-there"])):
            events.append(event)

    asyncio.run(collect())
    result = events[-1].result
    assert result.finish_reason == "stop"
    assert result.text == full[:full.index(stop)]
    streamed = "".join(e.text for e in events)
    assert streamed == result.text and stop not in streamed
    # The tokens end with the one that completed the stop string (overlapped steps compute one more: dropped).
    assert result.tokens == full_result.tokens[:len(result.tokens)]
    assert stop in eng32.tokenizer.decode(result.tokens)
    assert stop not in eng32.tokenizer.decode(result.tokens[:-1])
    assert [t for e in events for t in e.token_ids] == result.tokens
    assert all(e.result is None for e in events[:-1])


def test_max_new_tokens_and_max_seq_len_give_length(eng32):
    result = eng32.generate([greedy(PROMPTS[0], n=5)])[0]
    assert result.finish_reason == "length" and len(result.tokens) == 5
    prompt_len = len(eng32.tokenizer.encode(PROMPTS[7]))
    clipped = eng32.generate([greedy(PROMPTS[7], n=10_000)])[0]     # clipped by max_seq_len = 512
    assert clipped.finish_reason == "length" and prompt_len + len(clipped.tokens) == 512


def test_cancel_frees_blocks_and_leaves_others_untouched(eng32):
    expected = eng32.generate([greedy(p, n=30) for p in PROMPTS[:3]])
    victim = eng32.submit(greedy(PROMPTS[4], n=400))
    others = [eng32.submit(greedy(p, n=30)) for p in PROMPTS[:3]]
    while not victim.poll():
        time.sleep(0.001)
    eng32.cancel(victim.request_id)
    cancelled = victim.result(timeout=30)
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < 400
    assert [h.result(timeout=60).tokens for h in others] == [r.tokens for r in expected]
    stats = eng32.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]
    eng32.cancel(victim.request_id)                 # cancelling a finished request is harmless


def test_leaving_a_stream_early_cancels_the_request(eng32):
    async def take_two():
        got = []
        async for event in eng32.stream(greedy(PROMPTS[0], n=300)):
            got.append(event)
            if len(got) == 2:
                break
        return got

    assert len(asyncio.run(take_two())) == 2
    deadline = time.time() + 10
    while eng32.stats()["running"] and time.time() < deadline:
        time.sleep(0.01)
    assert eng32.stats()["kv_free_blocks"] == eng32.stats()["kv_total_blocks"]


def test_enqueue_request_with_messages(eng32):
    messages = [{"role": "system", "content": "You are a grumpy innkeeper."},
                {"role": "user", "content": "Got any rooms?"}]

    async def main():
        return await asyncio.gather(*(eng32.enqueue_request(GenerationRequest(
            messages=messages, max_new_tokens=8, temperature=0, ignore_eos=True)) for _ in range(3)))

    results = asyncio.run(main())
    ids = eng32.tokenizer.encode_chat(messages)
    assert results[0].usage.prompt_tokens == len(ids)
    assert all(r.tokens == results[0].tokens for r in results)
    assert results[0].timings.ttft_ms is not None and results[0].timings.total_ms >= results[0].timings.ttft_ms


@pytest.mark.parametrize("kwargs,field", [
    (dict(prompt="hello " * 600), "max_seq_len"),
    (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="hi", top_p=0.0), "top_p"),
    (dict(prompt="hi", top_p=1.01), "top_p"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", top_k=-1), "top_k"),
    (dict(), "prompt"),
    (dict(prompt="hi", messages=[{"role": "user", "content": "x"}]), "prompt"),
    (dict(messages=[{"role": "user", "content": 5}]), "content"),
    (dict(prompt_token_ids=[1, 10**9]), "prompt_token_ids"),
    (dict(prompt="hi", stop="END"), "stop"),
])
def test_bad_input_is_rejected_and_engine_keeps_serving(eng32, kwargs, field):
    with pytest.raises(ValueError, match=field):
        eng32.generate([GenerationRequest(**kwargs)])
    with pytest.raises(ValueError, match=field):
        asyncio.run(eng32.enqueue_request(GenerationRequest(**kwargs)))
    assert eng32.generate([greedy("still alive?", n=3)])[0].finish_reason == "length"


def test_duplicate_request_id_is_rejected(eng32):
    first = eng32.submit(greedy(PROMPTS[0], n=50, request_id="npc-1"))
    with pytest.raises(ValueError, match="request_id"):
        eng32.submit(greedy(PROMPTS[1], n=5, request_id="npc-1"))
    assert first.result(timeout=30).finish_reason == "length"
    assert eng32.generate([greedy(PROMPTS[1], n=3, request_id="npc-1")])[0].request_id == "npc-1"


def test_close_cancels_pending_and_refuses_new(llama32_dir):
    eng = engine(llama32_dir)
    handle = eng.submit(greedy(PROMPTS[0], n=500))
    eng.close()
    assert handle.result(timeout=10).finish_reason in ("cancelled", "length")
    with pytest.raises(RuntimeError, match="closed"):
        eng.submit(greedy("x"))


def test_a_closed_engine_is_freed_with_its_kv_pool_as_soon_as_it_is_dropped(llama32_dir):
    """A game that swaps models closes one engine and loads the next: the first one's device memory must come
    back then, not at Python's next cycle collection (bench_gpu's 8B engine once found the 3B's pool held)."""
    import gc
    import weakref
    eng = engine(llama32_dir)
    eng.generate([greedy(PROMPTS[0], n=4), greedy(PROMPTS[1], n=6, json_schema={"type": "array"}),
                  GenerationRequest(prompt=PROMPTS[2], max_new_tokens=4, temperature=0.8, top_p=0.9, seed=1)])
    eng.report_frame(20.0, 16.7)
    eng.report_idle(5.0)
    eng.close()
    gc.collect()
    gc.disable()
    try:
        gone, pool = weakref.ref(eng), weakref.ref(eng.kv_cache)
        del eng
        assert gone() is None and pool() is None
    finally:
        gc.enable()


def test_failing_logits_processor_fails_only_its_request(eng32):
    def broken(token_ids, logits):
        raise RuntimeError("boom")

    expected = eng32.generate([greedy(p, n=10) for p in PROMPTS[:2]])
    results = eng32.generate([greedy(PROMPTS[0], n=10), greedy(PROMPTS[1], n=10, logits_processor=broken),
                              greedy(PROMPTS[1], n=10)])
    assert results[1].finish_reason == "error" and "boom" in results[1].error
    assert [results[0].tokens, results[2].tokens] == [r.tokens for r in expected]
    stats = eng32.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


class _UncheckedRequest(GenerationRequest):
    """A request whose sampling values slipped past validation: the engine must contain it at step time."""

    def sampling_params(self):
        params = super().sampling_params()
        object.__setattr__(params, "temperature", "hot")
        return params


def test_a_request_whose_sampling_fails_fails_alone(eng32):
    expected = eng32.generate([greedy(p, n=10) for p in PROMPTS[:2]])
    results = eng32.generate([greedy(PROMPTS[0], n=10), _UncheckedRequest(prompt=PROMPTS[1], max_new_tokens=10),
                              greedy(PROMPTS[1], n=10)])
    assert results[1].finish_reason == "error" and "sampling failed" in results[1].error
    assert [results[0].tokens, results[2].tokens] == [r.tokens for r in expected]
    assert [r.finish_reason for r in (results[0], results[2])] == ["length", "length"]
    stats = eng32.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


def test_step_listener_sees_every_step(llama32_dir):
    with engine(llama32_dir) as eng:
        infos = []
        eng.add_step_listener(infos.append)
        eng.generate([greedy(PROMPTS[0], n=6), greedy(PROMPTS[1], n=4)])
        eng.close()                      # joins the engine thread: the last step's listener call is done
        assert [i.step for i in infos] == list(range(1, len(infos) + 1))
        assert infos[0].num_tokens > 2 and infos[-1].num_decodes == 1 and all(i.seconds > 0 for i in infos)
        assert infos[-1].running == 0 and infos[-1].kv_free_blocks == eng.stats()["kv_total_blocks"]


def test_generate_submits_its_requests_together(llama32_dir):
    """A generate call's requests reach the scheduler at once: the first step prefills all of them, whatever
    the engine thread was doing (same calls, same batches, same bits). A bad one queues none of them."""
    with engine(llama32_dir) as eng:
        infos = []
        eng.add_step_listener(infos.append)
        for _ in range(3):
            infos.clear()
            eng.generate([greedy(p, n=2) for p in PROMPTS[:3]])
            assert infos[0].num_seqs == 3
        good = greedy(PROMPTS[0], n=2, request_id="good")
        with pytest.raises(ValueError, match="priority"):
            eng.generate([good, GenerationRequest(prompt="x", max_new_tokens=2, priority="high")])
        assert eng.generate([good])[0].finish_reason == "length"   # its id was released, nothing ran
        assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]


def test_gpu_memory_budget_sizes_the_kv_pool(llama32_dir):
    """The budget is for everything: a bigger budget buys KV blocks, a budget below the weights is refused."""
    with engine(llama32_dir, gpu_memory_mb=700) as small, engine(llama32_dir, gpu_memory_mb=900) as big:
        assert big.block_manager.num_blocks > small.block_manager.num_blocks > 0
        extra_mb = (big.block_manager.num_blocks - small.block_manager.num_blocks) * 16 * 2 * 2 * 2 * 16 * 4 / 2**20
        assert extra_mb == pytest.approx(200, abs=1)
    with pytest.raises(ValueError, match="gpu_memory_mb"):
        engine(llama32_dir, gpu_memory_mb=10)


def test_overlapped_steps_queue_ahead_and_change_nothing(llama32_dir, overlap_mode):
    """Steps queued ahead (inputs from the device-side tokens) give exactly the lock-step results."""
    if overlap_mode:
        pytest.skip("compares both modes itself; once is enough")
    reqs = lambda: [  # noqa: E731
        greedy(PROMPTS[0], n=24),
        GenerationRequest(prompt=PROMPTS[1], max_new_tokens=30, temperature=0.9, top_k=40, top_p=0.9, seed=7,
                          ignore_eos=True, logprobs=3),
        GenerationRequest(prompt=PROMPTS[3], max_new_tokens=17, temperature=1.2, seed=3, ignore_eos=True),
        greedy(PROMPTS[5], n=40, stop=["e", "\n"]),
        greedy(PROMPTS[6], n=3),
    ]
    results = {}
    for overlap in (False, True):
        with engine(llama32_dir, overlap_steps=overlap) as eng:
            results[overlap] = eng.generate(reqs())
            ahead = eng.num_steps_ahead
            assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]
        assert (ahead > 0) == overlap
    for a, b in zip(results[False], results[True]):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason)
        assert (a.logprobs is None) == (b.logprobs is None)
        if a.logprobs:
            # Ids exactly; values to float noise: requests reaching the engine thread one by one may batch
            # differently in the two runs, and a matmul's rounding depends on its batch.
            assert [(x.token_id, [t for t, _ in x.top]) for x in a.logprobs] == \
                [(x.token_id, [t for t, _ in x.top]) for x in b.logprobs]
            flat = lambda r: [v for x in r.logprobs for v in [x.logprob] + [p for _, p in x.top]]  # noqa: E731
            assert flat(a) == pytest.approx(flat(b), rel=2e-5, abs=2e-5)


def test_step_budget_in_the_engine_fits_predicted_steps_and_keeps_decodes_going(llama32_dir):
    """With step_budget_ms, once the cost model has learned this machine's steps, every step's predicted time
    fits the budget (or makes only the least prefill progress: 16 tokens, or more while that is predicted to
    cost at most LEAST_PIECE_SLACK times as much), running decodes get a token every step, and a 2,000-token
    prompt still completes."""
    from gllm.scheduler.scheduler import LEAST_PIECE_MAX, LEAST_PIECE_SLACK, MIN_PREFILL_CHUNK, Scheduler
    eng = engine(llama32_dir, max_seq_len=4096, kv_cache_tokens=16384, step_budget_ms=3.0)
    try:
        # Warm-up: steps of many shapes, so the model is fitted.
        eng.generate([greedy(p * (1 + i % 4), n=8 + i) for i, p in enumerate(PROMPTS * 2)])
        eng.generate([greedy(PROMPTS[0] * 6, n=40)])
        assert eng.cost_model.ready and eng.stats()["step_cost_fixed_us"] >= 0
        recorded = []
        schedule = eng.scheduler.schedule_step

        def recording_schedule(now=None):    # runs on the engine thread: the model as it was at this step
            out = schedule(now)
            least = copy.copy(out)            # the same step with its prefill cut to 16 tokens
            least.scheduled = [copy.copy(s) for s in out.scheduled]
            for s in least.scheduled:
                s.num_tokens = min(s.num_tokens, MIN_PREFILL_CHUNK)
            recorded.append((out, {s.seq.seq_id: s.num_tokens for s in out.scheduled},
                             eng.cost_model.predict(out.shape), eng.cost_model.predict(Scheduler.shape(least))))
            return out

        eng.scheduler.schedule_step = recording_schedule
        # Decoders that cannot finish before the long prompt does, whatever the device: cancelled at the end.
        decoders = [eng.submit(greedy(p, n=3000)) for p in PROMPTS[:3]]
        while not all(h.poll() or h.done for h in decoders):
            time.sleep(0.005)
        decoder_ids = {eng._states[h.request_id].seq.seq_id for h in decoders}
        long_prompt = " ".join(f"word{i}" for i in range(1000))      # ~2,000 tokens
        long = eng.submit(greedy(long_prompt, n=2))
        assert long.result(timeout=300).finish_reason == "length"
        budget = 3.0 / 1000
        for out, _, predicted, least in recorded:
            prefill = out.shape.prefill_tokens
            assert predicted <= budget + 1e-9 or prefill <= MIN_PREFILL_CHUNK \
                or prefill <= LEAST_PIECE_MAX and predicted <= LEAST_PIECE_SLACK * least + 1e-9, \
                (out.shape, predicted, least)
        long_steps = [tokens for _, tokens, *_ in recorded if any(n > 1 and i not in decoder_ids
                                                                 for i, n in tokens.items())]
        assert long_steps
        for tokens in long_steps:           # the long prompt's prefill never cost a decode its token
            assert all(tokens.get(i) == 1 for i in decoder_ids), tokens
        for h in decoders:
            eng.cancel(h.request_id)
            h.result(timeout=30)
    finally:
        eng.close()


def test_max_tokens_per_s_paces_a_reply_while_another_runs_unpaced(eng32):
    """A reply paced at 40 tokens a second arrives at that rate (within 10 % over 100 tokens), one token at a
    time, while an unpaced request runs beside it."""
    import threading
    arrivals: list[tuple[float, int]] = []
    done = threading.Event()

    def on_event(ev) -> None:
        if ev.token_ids:
            arrivals.append((time.monotonic(), len(ev.token_ids)))
        if ev.finished:
            done.set()

    eng32.add_request(greedy(PROMPTS[1], n=100, max_tokens_per_s=40.0), on_event)
    free = eng32.generate([greedy(PROMPTS[0], n=100)])[0]
    assert done.wait(60)
    assert sum(n for _, n in arrivals) == 100 and all(n == 1 for _, n in arrivals)
    rate = 99 / (arrivals[-1][0] - arrivals[0][0])
    assert 36 <= rate <= 44, rate
    assert len(free.tokens) == 100


def test_ttft_deadline_is_reported_met_or_missed(eng32):
    met, missed, none = eng32.generate([greedy("a", n=2, ttft_deadline_ms=60_000.0),
                                        greedy("a", n=2, ttft_deadline_ms=0.001), greedy("a", n=2)])
    assert met.timings.ttft_deadline_met is True
    assert missed.timings.ttft_deadline_met is False
    assert none.timings.ttft_deadline_met is None
    for field, value in (("max_tokens_per_s", 5000.0), ("ttft_deadline_ms", -1.0)):
        with pytest.raises(ValueError, match=field):
            eng32.generate([greedy("a", n=2, **{field: value})])


def test_a_failure_outside_any_step_ends_the_requests_in_flight_and_the_engine_serves_on(llama32_dir):
    """A bug in scheduling (here: schedule_step raising once) must not kill the engine thread: the requests in
    flight each end with exactly one error event, their blocks come back, and the next request runs."""
    with engine(llama32_dir) as eng:
        calls = {"n": 0}

        def broken_once(real):
            # The second scheduling decision (the step after the prompts went in: both are running), whichever
            # way it is taken: with overlap on a GPU the next decode step is chosen by schedule_ahead.
            def decide(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("scheduler bug")
                return real(*args, **kwargs)
            return decide

        eng.scheduler.schedule_step = broken_once(eng.scheduler.schedule_step)
        eng.scheduler.schedule_ahead = broken_once(eng.scheduler.schedule_ahead)
        results = eng.generate([greedy(PROMPTS[0], n=20), greedy(PROMPTS[1], n=20)], timeout=60)
        assert [r.finish_reason for r in results] == ["error", "error"]
        assert all("scheduler bug" in r.error for r in results)
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        again = eng.generate([greedy(PROMPTS[2], n=5)], timeout=60)[0]
        assert again.finish_reason == "length" and len(again.tokens) == 5

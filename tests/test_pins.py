"""Pinned prefixes (LLMEngine.pin/unpin, pin_prefix): pinned blocks survive pool pressure that evicts
everything else, count in stats, are refused when they would starve requests, and come back on unpin."""

from __future__ import annotations

import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.engine.errors import PinRefused

LORE = ("World lore: the kingdom of Eldmoor sits between two rivers. Dragons sleep in the northern mountains "
        "and the guild of smiths forges their scales into armour. ")
OTHER = ("Tavern rumours: the miller's daughter has seen lights over the marsh, and the priest will not say "
         "what he buried under the old chapel. ")


def engine(folder, **kw) -> LLMEngine:
    # 24 blocks of 8 tokens; a max_seq_len request needs 8 of them, so pins may hold 16.
    params = dict(block_size=8, max_batch_size=4, max_seq_len=64, kv_cache_tokens=192, cpu_threads=1,
                  dtype="float32", overlap_steps=False, result_cache_entries=0)
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device="cpu")


def ask(eng: LLMEngine, prefix: str, line: str, n: int = 4):
    return eng.generate(GenerationRequest(prompt=prefix + line, max_new_tokens=n, temperature=0,
                                          ignore_eos=True))[0]


def pressure(eng: LLMEngine) -> None:
    """Requests with fresh prompts that together need every block of the pool."""
    eng.generate([GenerationRequest(prompt_token_ids=[1000 + 97 * i + j for j in range(40)], max_new_tokens=8,
                                    temperature=0, ignore_eos=True) for i in range(4)])


def full_blocks(eng: LLMEngine, text: str) -> int:
    return len(eng.tokenizer.encode(text)) // eng.gen_params.block_size * eng.gen_params.block_size


def test_pinned_blocks_survive_pressure_that_evicts_everything_else(llama32_dir):
    with engine(llama32_dir) as eng:
        pin_id = eng.pin(LORE)
        assert eng.pin(LORE) == pin_id                                    # the same tokens: the same pin
        pinned = full_blocks(eng, LORE)
        assert eng.pins() == {pin_id: pinned} and pinned >= 24
        stats = eng.stats()
        assert stats["pins"] == 1 and stats["pinned_blocks"] == pinned // 8
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"] - pinned // 8
        ask(eng, OTHER, "Who?")                                           # cached, not pinned
        assert ask(eng, OTHER, "Why?").usage.cached_tokens >= 16
        pressure(eng)
        assert ask(eng, OTHER, "When?").usage.cached_tokens == 0          # evicted
        assert ask(eng, LORE, "Guard, what do you see?").usage.cached_tokens == pinned   # still there
        pressure(eng)
        assert ask(eng, LORE, "Smith, what now?").usage.cached_tokens == pinned
        assert eng.unpin(pin_id) and not eng.unpin(pin_id)
        stats = eng.stats()
        assert stats["pins"] == stats["pinned_blocks"] == 0
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


def test_a_pin_that_would_starve_requests_is_refused_and_the_engine_serves_on(llama32_dir):
    with engine(llama32_dir, max_seq_len=128, kv_cache_tokens=160) as eng:   # 20 blocks; pins may hold 4
        ids = [3000 + i for i in range(40)]                                  # 5 blocks
        with pytest.raises(PinRefused) as info:
            eng.pin(ids)
        assert info.value.field == "pin" and "at most 4" in str(info.value)
        small = eng.pin(ids[:32])                                            # 4 blocks: allowed
        with pytest.raises(PinRefused):
            eng.pin([5000 + i for i in range(8)])                            # a fifth block: refused
        with pytest.raises(PinRefused):
            eng.pin([1, 2, 3])                                               # not one whole block
        assert ask(eng, LORE, "Still there?").finish_reason == "length"
        eng.unpin(small)
        assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]


def test_pin_prefix_pins_the_system_part_of_a_chat(llama32_dir):
    with engine(llama32_dir, max_seq_len=128, kv_cache_tokens=256) as eng:
        system = {"role": "system", "content": LORE}
        req = GenerationRequest(messages=[system, {"role": "user", "content": "Who rules here?"}],
                                max_new_tokens=3, temperature=0, pin_prefix=True)
        eng.generate(req)
        pins = eng.pins()
        system_ids = eng.tokenizer.encode_chat([system], add_generation_prompt=False)
        assert list(pins.values()) == [len(system_ids) // 8 * 8]
        assert eng.pin([system]) in pins                                     # pinning the same messages: that pin
        pressure(eng)
        again = eng.generate(GenerationRequest(messages=[system, {"role": "user", "content": "And the river?"}],
                                               max_new_tokens=3, temperature=0))[0]
        assert again.usage.cached_tokens >= len(system_ids) // 8 * 8
        for pin_id in pins:
            eng.unpin(pin_id)
        assert eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]


def test_close_releases_pins(llama32_dir):
    eng = engine(llama32_dir)
    eng.pin(LORE)
    eng.close()
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    with pytest.raises(RuntimeError):
        eng.pin(LORE)

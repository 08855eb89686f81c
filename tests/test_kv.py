"""gllm.kv: block pools, reference counts, prefix caching, LRU reuse, sizing."""

from __future__ import annotations

import pytest
import torch

from gllm.kv import BlockManager, BlockTable, KVCache, kv_bytes_per_token, num_blocks_for
from gllm.kv import block_manager as bm
from gllm.model import ModelConfig

CFG = ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [offset + i for i in range(n)]


def test_sizing_from_tokens_and_megabytes():
    assert kv_bytes_per_token(CFG, torch.float32) == 2 * 2 * 2 * 16 * 4
    assert num_blocks_for(CFG, torch.float32, 16, tokens=1000) == 62
    assert num_blocks_for(CFG, torch.float32, 16, memory_mb=1) == 2**20 // 512 // 16
    cache = KVCache(CFG, 10, 16, torch.float16, "cpu")
    assert cache.nbytes == 10 * 16 * kv_bytes_per_token(CFG, torch.float16)
    with pytest.raises(ValueError):
        num_blocks_for(CFG, torch.float32, 16, tokens=8)


def test_allocate_grow_free_counts():
    m = BlockManager(10, 4)
    t = BlockTable()
    assert m.allocate_prompt(t, prompt(10), 10) == (0, 10)
    assert len(t.block_ids) == 3 and m.num_free_blocks == 7
    assert m.grow(t, 13) and len(t.block_ids) == 4
    assert not m.grow(t, 100) and len(t.block_ids) == 4   # nothing taken on failure
    m.free(t)
    assert m.num_free_blocks == 10 and t.block_ids == []
    assert all(b.ref_count == 0 for b in m.blocks)


def test_prefix_hit_shares_blocks_and_counts():
    m = BlockManager(20, 4)
    a, b = BlockTable(), BlockTable()
    tokens = prompt(14)
    m.allocate_prompt(a, tokens, 14)
    m.register_computed(a, tokens, 14)           # blocks 0..2 full and computed
    assert a.num_hashed == 3
    cached, n = m.allocate_prompt(b, tokens[:12] + [99, 98], 100)
    assert cached == 12 and n == 2                # three shared blocks, the rest computed
    assert b.block_ids[:3] == a.block_ids[:3]
    assert all(m.blocks[i].ref_count == 2 for i in a.block_ids[:3])
    assert m.stats.hits == 3
    m.free(a)
    m.free(b)
    assert m.num_free_blocks == 20


def test_full_prompt_hit_still_leaves_a_token_to_compute():
    m = BlockManager(20, 4)
    a, b = BlockTable(), BlockTable()
    m.allocate_prompt(a, prompt(8), 8)
    m.register_computed(a, prompt(8), 8)
    cached, n = m.allocate_prompt(b, prompt(8), 8)
    assert (cached, n) == (4, 4)                  # the last block is recomputed for its logits


def test_hash_collision_is_verified_by_tokens(monkeypatch):
    monkeypatch.setattr(bm, "chain_hash", lambda parent, tokens: 42)   # every block collides
    m = BlockManager(20, 4)
    a, b = BlockTable(), BlockTable()
    m.allocate_prompt(a, prompt(9), 9)
    m.register_computed(a, prompt(9), 9)
    cached, _ = m.allocate_prompt(b, prompt(9, offset=50), 9)
    assert cached == 0                            # same hash, other tokens: a miss


def test_freed_cached_blocks_are_reused_lru_and_evicted_last():
    m = BlockManager(6, 2)
    old, new = BlockTable(), BlockTable()
    m.allocate_prompt(old, prompt(5), 5)
    m.register_computed(old, prompt(5), 5)
    m.free(old)                                   # 2 hashed blocks wait in the cache, 1 plain block is free
    m.allocate_prompt(new, prompt(5, offset=100), 5)   # needs 3: plain blocks go first
    m.register_computed(new, prompt(5, offset=100), 5)
    assert m.match_prefix(prompt(5)) != []        # the cached prefix survived
    m.free(new)
    again = BlockTable()
    cached, _ = m.allocate_prompt(again, prompt(5), 5)
    assert cached == 4
    big = BlockTable()
    m.free(again)
    # The least recently freed cached blocks are evicted first.
    m.allocate_prompt(big, prompt(11, offset=200), 11)
    assert m.num_free_blocks == 0 and m.match_prefix(prompt(5)) == []
    m.free(big)
    assert m.num_free_blocks == 6


def test_prefix_caching_off():
    m = BlockManager(10, 4, enable_prefix_caching=False)
    a, b = BlockTable(), BlockTable()
    m.allocate_prompt(a, prompt(9), 9)
    m.register_computed(a, prompt(9), 9)
    assert m.allocate_prompt(b, prompt(9), 9) == (0, 9)
    assert m.stats.hits == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_cpu_pool_takes_memory_only_as_its_blocks_are_used():
    big = ModelConfig(vocab_size=100, hidden_size=512, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    before = _rss_bytes()
    cache = KVCache(big, 2048, 16, torch.float32, "cpu")          # 512 MiB of pools
    assert cache.nbytes == 512 * 2**20
    assert _rss_bytes() - before < 32 * 2**20
    for k, v in cache.layers:            # the first 64 blocks in use: 1/32 of the pool
        k[:64].fill_(1.0)
        v[:64].fill_(1.0)
    grown = _rss_bytes() - before
    assert 12 * 2**20 < grown < 64 * 2**20, grown
    k, v = cache.layers[-1]
    assert not k[64:].any() and not v[1000:1100].any()       # the rest reads as zeros


def test_freed_blocks_are_reused_before_untouched_ones():
    m = BlockManager(100, 4, enable_prefix_caching=False)
    a, b = BlockTable(), BlockTable()
    m.allocate_prompt(a, prompt(8), 8)
    assert a.block_ids == [0, 1]
    m.allocate_prompt(b, prompt(8, 50), 8)
    assert b.block_ids == [2, 3]
    m.free(a)
    c = BlockTable()
    m.allocate_prompt(c, prompt(12, 70), 12)
    assert sorted(c.block_ids) == [0, 1, 4]     # the freed pair first, then the lowest untouched block


def test_import_blocks_registers_fresh_blocks_holds_cached_ones_and_release_gives_all_back():
    m = bm.BlockManager(8, 4)
    t = BlockTable()
    assert m.allocate_prompt(t, prompt(9), 9) == (0, 9)
    m.register_computed(t, prompt(9), 9)            # blocks 0 and 1 of the prompt are cached
    m.free(t)
    held, fresh = m.import_blocks(prompt(16))      # 4 whole blocks: 2 cached, 2 fresh
    assert len(held) == 4 and [i for i, _ in fresh] == [2, 3]
    assert m.num_free_blocks == 4 and m.cached_blocks(prompt(16)) == held
    m.release(held)
    assert m.num_free_blocks == 8 and m.cached_blocks(prompt(16)) == held   # cached, evictable
    assert m.import_blocks(prompt(40)) is None     # 10 blocks: more than the pool
    assert m.num_free_blocks == 8
    m.hold(held[:2])                               # a pin: never evicted while held
    t2 = BlockTable()
    assert m.allocate_prompt(t2, prompt(24, 100), 24) == (0, 24)   # takes every free block but the held two
    assert m.cached_blocks(prompt(8)) == held[:2]
    m.free(t2)
    m.release(held[:2])
    assert m.num_free_blocks == 8

"""Paged KV cache: block pools, the block manager, and the position → slot mapping."""

from gllm.kv.block_manager import Block, BlockManager, BlockTable, PrefixCacheStats
from gllm.kv.cache import KVCache, kv_bytes_per_token, num_blocks_for
from gllm.kv.slots import slot_of, slots_array, slots_of

__all__ = ["Block", "BlockManager", "BlockTable", "KVCache", "PrefixCacheStats", "kv_bytes_per_token",
           "num_blocks_for", "slot_of", "slots_array", "slots_of"]

"""Paged KV cache: block pools and the block manager."""

from gllm.kv.block_manager import Block, BlockManager, BlockTable, PrefixCacheStats
from gllm.kv.cache import KVCache, kv_bytes_per_token, num_blocks_for

__all__ = ["Block", "BlockManager", "BlockTable", "KVCache", "PrefixCacheStats", "kv_bytes_per_token",
           "num_blocks_for"]


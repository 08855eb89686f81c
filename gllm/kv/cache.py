"""The KV cache tensors: one K and one V block pool per layer."""

from __future__ import annotations

import math
import mmap

import torch

from gllm.kv.slots import slot_of
from gllm.model.config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * element


def num_blocks_for(cfg: ModelConfig, dtype: torch.dtype, block_size: int, *, tokens: int | None = None,
                   memory_mb: float | None = None) -> int:
    """Blocks from a token capacity or a memory budget (exactly one of them)."""
    if (tokens is None) == (memory_mb is None):
        raise ValueError("size the KV cache with exactly one of kv_cache_tokens / kv_cache_mb")
    if tokens is None:
        tokens = int(memory_mb * 2**20) // kv_bytes_per_token(cfg, dtype)
    blocks = tokens // block_size
    if blocks < 1:
        raise ValueError(f"KV cache of {tokens} tokens holds no block of {block_size} tokens")
    return blocks


class KVCache:
    """Per-layer paged pools shaped [num_blocks (+1), block_size, kv_heads, head_dim].

    With `scratch_block`, the pools hold one block more, `self.scratch_block`, that the block manager never
    hands out: the write target of padding rows in fixed-shape (CUDA graph) steps, which nothing reads."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, scratch_block: bool = False) -> None:
        shape = (num_blocks + int(scratch_block), block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.scratch_block: int | None = num_blocks if scratch_block else None
        self.layers = [(_zeros(shape, dtype, device), _zeros(shape, dtype, device))
                       for _ in range(cfg.num_hidden_layers)]

    @property
    def scratch_slot(self) -> int:
        """The first slot of the scratch block (padding rows write there)."""
        assert self.scratch_block is not None, "this cache was made without a scratch block"
        return slot_of([self.scratch_block], 0, self.block_size)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed pool. On the CPU it lives in an anonymous memory map: the OS maps zero pages as they are first
    written, so the pool takes memory only as its blocks come into use (the block manager hands out the
    lowest untouched block last, after every freed one)."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    buffer = mmap.mmap(-1, max(1, count * torch.empty((), dtype=dtype).element_size()))
    return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)   # the tensor keeps the map alive

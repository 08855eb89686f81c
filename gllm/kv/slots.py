"""Position → KV slot: where a sequence's token at `position` lives in the block pools.

A pool is [num_blocks, block_size, ...] viewed flat as slots; a sequence's block table lists its blocks
in order, so its token at position p sits in slot `block_ids[p // block_size] * block_size + p % block_size`.
Everything that writes K/V (the model runner, the CUDA graphs' input staging) asks here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def slot_of(block_ids: Sequence[int], position: int, block_size: int) -> int:
    return block_ids[position // block_size] * block_size + position % block_size


def slots_of(block_ids: Sequence[int], start: int, end: int, block_size: int) -> list[int]:
    """The slots of positions start..end-1."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def slots_array(block_ids: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """`slots_of` for numpy arrays (the graph staging paths fill pinned buffers through numpy)."""
    return block_ids[positions // block_size] * block_size + positions % block_size

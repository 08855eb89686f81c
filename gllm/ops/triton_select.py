"""Input tokens of a decode step queued before the previous step's tokens reached the host.

A step queued ahead takes sequence i's input from the previous step's sampled ids on the device
(`source[gather_rows[i]]`); the others come from the host (`gather_rows[i] < 0`). One tiny kernel
inside the step's CUDA graph, where a gather outside it cost the GPU a launch of its own each step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select_tokens_kernel(ids_ptr, rows_ptr, source_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < N
    rows = tl.load(rows_ptr + offs, mask=ok, other=-1)
    gathered = tl.load(source_ptr + tl.maximum(rows, 0), mask=ok & (rows >= 0))
    ids = tl.load(ids_ptr + offs, mask=ok)
    tl.store(ids_ptr + offs, tl.where(rows >= 0, gathered, ids), mask=ok)


def select_tokens(input_ids: torch.Tensor, gather_rows: torch.Tensor, source: torch.Tensor) -> None:
    """In place: input_ids[i] = source[gather_rows[i]] wherever gather_rows[i] >= 0 (all int64, 1-D, on one
    CUDA device; every such row must lie inside `source`)."""
    n = input_ids.shape[0]
    if gather_rows.shape[0] != n:
        raise ValueError(f"gather_rows has {gather_rows.shape[0]} rows, input_ids {n}")
    if n:
        _select_tokens_kernel[(1,)](input_ids, gather_rows, source, n, BLOCK=max(16, triton.next_power_of_2(n)),
                                    num_warps=1 if n <= 128 else 4)

"""Embedding lookup for decode steps, taking each input token from the host or from the device.

A step queued ahead takes sequence i's input from the previous step's sampled ids on the device
(`source[gather_rows[i]]`); the others come from the host (`gather_rows[i] < 0`: `input_ids[i]`).
One kernel does the choice and the lookup inside the step's CUDA graph, where a gather outside it
cost a launch of its own each step, and (dependent launch) it lets the first q/k/v projection
start streaming its weights at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _embed_kernel(weight_ptr, ids_ptr, rows_ptr, source_ptr, out_ptr, H, stride_w, stride_o,
                  BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:   # the next kernel reads only weights before its wait: let it launch now
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    gather = tl.load(rows_ptr + row)
    token = tl.load(ids_ptr + row)
    if gather >= 0:
        token = tl.load(source_ptr + gather)
    ok = cols < H
    vals = tl.load(weight_ptr + token * stride_w + cols, mask=ok)
    tl.store(out_ptr + row * stride_o + cols, vals, mask=ok)


def embed_tokens(weight: torch.Tensor, input_ids: torch.Tensor, gather_rows: torch.Tensor, source: torch.Tensor,
                 dependent_launch: bool = False) -> torch.Tensor:
    """weight[token] for each row [N, H], the token being source[gather_rows[i]] where gather_rows[i] >= 0,
    else input_ids[i] (all int64 and 1-D, on the weight's CUDA device; gathered rows must lie in `source`).
    dependent_launch: programmatic dependent launch (compute capability 9.0+, see `triton_gemv.linear`)."""
    n, hidden = input_ids.shape[0], weight.shape[1]
    if gather_rows.shape[0] != n:
        raise ValueError(f"gather_rows has {gather_rows.shape[0]} rows, input_ids {n}")
    out = torch.empty(n, hidden, dtype=weight.dtype, device=weight.device)
    if n:
        block = min(1024, triton.next_power_of_2(hidden))
        pdl = {"launch_pdl": True} if dependent_launch else {}
        _embed_kernel[(n, triton.cdiv(hidden, block))](weight, input_ids, gather_rows, source, out, hidden,
                                                        weight.stride(0), out.stride(0), BLOCK=block,
                                                        USE_PDL=dependent_launch, num_warps=4, **pdl)
    return out

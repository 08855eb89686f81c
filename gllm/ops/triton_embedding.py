"""Embedding lookup for decode steps, taking each input token from the host or from the device; also from an
embedding kept quantized (`QuantWeight`), dequantizing only the rows looked up.

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

from gllm.ops.quant_layout import INTERLEAVE, QuantWeight
from gllm.ops.triton_quant_gemv import _code_at, _group_scales, kernel_operands


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


@triton.jit
def _embed_quantized_kernel(w_ptr, s_ptr, z_ptr, h_ptr, ids_ptr, rows_ptr, source_ptr, out_ptr, K, stride_o,
                            GROUP: tl.constexpr, BITS: tl.constexpr, SCALES: tl.constexpr, HAS_ZERO: tl.constexpr,
                            HAS_SOURCE: tl.constexpr, BLOCK: tl.constexpr, R: tl.constexpr,
                            USE_PDL: tl.constexpr):
    # As _embed_kernel, then the token's row dequantized as `_dequantize_kernel` does a whole weight.
    row = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    token = tl.load(ids_ptr + row).to(tl.int64)
    if HAS_SOURCE:
        gather = tl.load(rows_ptr + row)
        if gather >= 0:
            token = tl.load(source_ptr + gather).to(tl.int64)
    ok = ks < K
    quad, lane = token // R, token % R
    code = _code_at(w_ptr, h_ptr, quad, lane, ks, ok, K, BITS, R)
    scale, zero = _group_scales(s_ptr, z_ptr, quad, ks // GROUP, lane, ok, K // GROUP, SCALES, HAS_ZERO, R)
    value = code.to(tl.float32) * scale
    if HAS_ZERO:
        value += zero
    tl.store(out_ptr + row * stride_o + ks, value.to(out_ptr.dtype.element_ty), mask=ok)


def embed_quantized_tokens(weight: QuantWeight, input_ids: torch.Tensor, dtype: torch.dtype,
                           token_source: tuple[torch.Tensor, torch.Tensor] | None = None,
                           dependent_launch: bool = False) -> torch.Tensor:
    """The dequantized rows of `weight` ([vocab, hidden] in the kernels' layout) for `input_ids` (1-D int64),
    [N, hidden] in `dtype`; with `token_source` = (gather_rows, source), row i takes its token as
    `embed_tokens` does."""
    n, hidden = input_ids.shape[0], weight.in_features
    out = torch.empty(n, hidden, dtype=dtype, device=weight.words.device)
    if n:
        rows, source = token_source if token_source is not None else (input_ids, input_ids)
        if rows.shape[0] != n:
            raise ValueError(f"gather_rows has {rows.shape[0]} rows, input_ids {n}")
        block = min(1024, triton.next_power_of_2(hidden))
        pdl = {"launch_pdl": True} if dependent_launch else {}
        _embed_quantized_kernel[(n, triton.cdiv(hidden, block))](
            weight.words, ids_ptr=input_ids, rows_ptr=rows, source_ptr=source, out_ptr=out, K=hidden,
            stride_o=out.stride(0), **kernel_operands(weight), HAS_SOURCE=token_source is not None, BLOCK=block,
            R=INTERLEAVE, USE_PDL=dependent_launch, num_warps=4, **pdl)
    return out

"""Row-wise argmax of the logits for a few rows, as two small Triton kernels.

torch's argmax gives each row to one block, so a batch-1 decode step spent ~28 µs on an H100
finding the largest of 128,256 logits: a few percent of the whole step. Here each row is cut into
chunks reduced by separate programs, and a second kernel reduces the chunks' winners. Ties go to
the smallest index, as torch's argmax does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, V, stride_x, NUM_CHUNKS, CHUNK: tl.constexpr,
                      USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if USE_PDL:   # the logits come from the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=offs < V, other=float("-inf"))
    best = tl.max(x, 0)
    first = tl.min(tl.where(x == best, offs, V), 0)
    tl.store(val_ptr + row * NUM_CHUNKS + chunk, best)
    tl.store(idx_ptr + row * NUM_CHUNKS + chunk, first)


@triton.jit
def _row_max_kernel(val_ptr, idx_ptr, out_ptr, V, NUM_CHUNKS, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    offs = tl.arange(0, BLOCK)
    ok = offs < NUM_CHUNKS
    vals = tl.load(val_ptr + row * NUM_CHUNKS + offs, mask=ok, other=float("-inf"))
    idxs = tl.load(idx_ptr + row * NUM_CHUNKS + offs, mask=ok, other=V)
    best = tl.max(vals, 0)
    tl.store(out_ptr + row, tl.min(tl.where(vals == best, idxs, V), 0).to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None, dependent_launch: bool = False) -> torch.Tensor:
    """argmax over the last dim of a float [B, V] CUDA tensor (unit stride along V); [B] int64, written into
    `out` if given. A row whose every value is -inf gives 0, as torch's does; NaN is not handled (torch ranks
    it highest). dependent_launch: programmatic dependent launch (compute capability 9.0+), as the decode
    kernels that write the logits use (see `triton_gemv.linear`)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    if out is not None and (out.shape != (rows,) or out.dtype != torch.int64 or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous int64 tensor of shape ({rows},), not {tuple(out.shape)} "
                         f"{out.dtype}")
    num_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    if out is None:
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    pdl = {"launch_pdl": True} if dependent_launch else {}
    if rows:
        _chunk_max_kernel[(rows, num_chunks)](logits, vals, idxs, vocab, logits.stride(0), num_chunks, CHUNK=CHUNK,
                                              USE_PDL=dependent_launch, num_warps=8, **pdl)
        _row_max_kernel[(rows,)](vals, idxs, out, vocab, num_chunks,
                                 BLOCK=max(16, triton.next_power_of_2(num_chunks)), USE_PDL=dependent_launch,
                                 num_warps=1, **pdl)
    return out

"""The sampler's exponential race as one Triton kernel (plus the argmax's row reduction): per row, the seeded
noise, the grammar mask and the argmax of logit / T - log(E) in one pass over the logits.

In torch the same step was ~25 launches over [B, V] temporaries (the noise hash alone is a dozen integer ops) and
a mask's unpacking five more: at batch 16 on the Llama-3 vocabulary, 0.8 ms of host time per step unconstrained
and 1.6 ms with masks (docs/benchmarks.md, issue 21), the host time a constrained step waits on. The kernel
computes the very same float32 values as `Sampler`'s torch path (IEEE division, libdevice's log), so a request
samples the same tokens either way, and on the CPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from gllm.sampling.triton_argmax import CHUNK, _row_max_kernel

# Triton's interpreter (CPU tests) has no libdevice; its numpy float32 log and division are the IEEE ones anyway.
_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _race_chunk_kernel(x_ptr, temp_ptr, key_ptr, hash_ptr, mask_ptr, mask_row_ptr, val_ptr, idx_ptr, V, stride_x,
                       WORDS, NUM_CHUNKS, CHUNK: tl.constexpr, HAS_MASK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=valid, other=float("-inf"))
    temperature = tl.load(temp_ptr + row)
    key = tl.load(key_ptr + row).to(tl.uint32)
    h = _fmix32(tl.load(hash_ptr + offs, mask=valid, other=0).to(tl.uint32) ^ key)
    uniform = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608)
    if _LIBDEVICE:
        log_e = libdevice.log(-libdevice.log(uniform))
        scaled = libdevice.div_rn(x, temperature)
    else:
        log_e = tl.log(-tl.log(uniform))
        scaled = x / temperature
    score = tl.where(temperature > 0, scaled - log_e, x)   # temperature 0: greedy
    if HAS_MASK:
        mask_row = tl.load(mask_row_ptr + row)
        if mask_row >= 0:
            words = tl.load(mask_ptr + mask_row.to(tl.int64) * WORDS + offs // 32, mask=valid, other=0)
            score = tl.where(((words >> (offs % 32)) & 1) != 0, score, float("-inf"))
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, 0)
    tl.store(val_ptr + row * NUM_CHUNKS + chunk, best)
    tl.store(idx_ptr + row * NUM_CHUNKS + chunk, tl.min(tl.where(score == best, offs, V), 0))


def race(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, token_hash: torch.Tensor,
         masks: torch.Tensor | None = None, mask_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B] int64 tokens: per row argmax over the vocabulary of logit / T - log(E) (E the row's seeded Exp(1)
    draws, `NoiseTable`), or of the logits where T is 0, over the tokens row `mask_rows[i]` of `masks` allows
    ([n, ceil(V/32)] int32 bitmasks; -1: no mask). logits [B, V] float32 contiguous along V; temperature [B]
    float32; keys [B] int32 or int64 (their low 32 bits count); token_hash [V] int64. Ties go to the smallest
    token id; a row with nothing allowed gives 0."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits must be contiguous along the vocabulary")
    num_chunks = triton.cdiv(vocab, CHUNK)
    vals = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    has_mask = masks is not None
    words = masks.shape[1] if has_mask else 0
    _race_chunk_kernel[(rows, num_chunks)](
        logits, temperature, keys, token_hash, masks if has_mask else logits, mask_rows if has_mask else keys,
        vals, idxs, vocab, logits.stride(0), words, num_chunks, CHUNK=CHUNK, HAS_MASK=has_mask, num_warps=8)
    _row_max_kernel[(rows,)](vals, idxs, out, vocab, num_chunks, BLOCK=max(16, triton.next_power_of_2(num_chunks)),
                             USE_PDL=False, num_warps=1)
    return out

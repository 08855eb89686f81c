"""Triton paged attention for decode: one query token per sequence, K/V read through block tables.

Shapes are fixed by the batch size alone (context lengths are read from a device tensor), so a
decode step containing it can be captured in a CUDA graph. The context is split over several
programs (flash-decoding) so that even one sequence spreads over the whole GPU; a second small
kernel merges the partial softmaxes. The query heads sharing a K/V head are processed together,
so each K/V block is read once per group, not once per query head.

Plain Triton (`tl.dot`, masked loads): runs on Ampere, Ada and Hopper alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def attend_block(q, k_cache_ptr, v_cache_ptr, kv_off, dims, tok_ok, visible, m_i, l_i, acc, scale,
                 DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a block of keys: load K/V at `kv_off`, fold them into (m_i, l_i, acc).
    Shared by the decode and prefill kernels; `visible` masks the scores (context end, causality)."""
    k = tl.load(k_cache_ptr + kv_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_off[:, None] + dims[None, :], mask=tok_ok[:, None], other=0.0)
    return attend_tile(q, k, v, visible, m_i, l_i, acc, scale, DOT_PRECISION)


@triton.jit
def attend_tile(q, k, v, visible, m_i, l_i, acc, scale, DOT_PRECISION: tl.constexpr):
    """`attend_block` on K/V tiles already loaded."""
    scores = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale).to(tl.float32)
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale,
    stride_q_b, stride_q_h,
    stride_kc_block, stride_kc_tok, stride_kc_head,
    stride_bt_b,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pm_b, stride_pm_h,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if USE_PDL:   # the next kernel may launch now: before its own wait it reads nothing this step writes
        tl.extra.cuda.gdc_launch_dependents()
    ctx = tl.load(context_lens_ptr + seq)   # set before the step: no kernel of it writes the lengths
    tokens_per_iter: tl.constexpr = BLOCK_SIZE * BLOCKS_PER_ITER
    # Split the context into NUM_SPLITS ranges of whole iterations.
    iters = tl.cdiv(ctx, tokens_per_iter)
    iters_per_split = tl.cdiv(iters, NUM_SPLITS)
    start_iter = split * iters_per_split
    end_iter = tl.minimum(start_iter + iters_per_split, iters)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    offs = tl.arange(0, tokens_per_iter)
    # The first tile: every token but this step's newest was written by an earlier step, so its K/V are
    # loaded before waiting for the kernel that writes q and the newest K/V (dependent launch); the
    # newest is patched in after the wait.
    newest = ctx - 1
    token = start_iter * tokens_per_iter + offs
    first_ok = token < tl.minimum(ctx, end_iter * tokens_per_iter)   # none if this split has no work
    block = tl.load(block_tables_ptr + seq * stride_bt_b + token // BLOCK_SIZE, mask=first_ok, other=0)
    first_off = block.to(tl.int64) * stride_kc_block + (token % BLOCK_SIZE) * stride_kc_tok \
        + kv_head * stride_kc_head
    old = (first_ok & (token != newest))[:, None]
    k = tl.load(k_cache_ptr + first_off[:, None] + dims[None, :], mask=old, other=0.0)
    v = tl.load(v_cache_ptr + first_off[:, None] + dims[None, :], mask=old, other=0.0)
    if USE_PDL:   # q and this step's K/V come from the kernel before
        tl.extra.cuda.gdc_wait()
    q = tl.load(q_ptr + seq * stride_q_b + heads[:, None] * stride_q_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    is_new = (first_ok & (token == newest))[:, None]
    k = tl.where(is_new, tl.load(k_cache_ptr + first_off[:, None] + dims[None, :], mask=is_new, other=0.0), k)
    v = tl.where(is_new, tl.load(v_cache_ptr + first_off[:, None] + dims[None, :], mask=is_new, other=0.0), v)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if start_iter < end_iter:
        m_i, l_i, acc = attend_tile(q, k, v, first_ok[None, :], m_i, l_i, acc, scale, DOT_PRECISION)
    for it in range(start_iter + 1, end_iter):
        token = it * tokens_per_iter + offs
        tok_ok = token < ctx
        block = tl.load(block_tables_ptr + seq * stride_bt_b + token // BLOCK_SIZE, mask=tok_ok, other=0)
        kv_off = block.to(tl.int64) * stride_kc_block + (token % BLOCK_SIZE) * stride_kc_tok \
            + kv_head * stride_kc_head
        m_i, l_i, acc = attend_block(q, k_cache_ptr, v_cache_ptr, kv_off, dims, tok_ok, tok_ok[None, :],
                                     m_i, l_i, acc, scale, DOT_PRECISION)

    out_off = seq * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s + dims[None, :]
    tl.store(part_out_ptr + out_off, acc, mask=row_ok[:, None])
    tl.store(part_max_ptr + seq * stride_pm_b + heads * stride_pm_h + split, m_i, mask=row_ok)
    tl.store(part_sum_ptr + seq * stride_pm_b + heads * stride_pm_h + split, l_i, mask=row_ok)


@triton.jit
def _decode_merge_kernel(
    part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, context_lens_ptr,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pm_b, stride_pm_h,
    stride_o_b, stride_o_h,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, TOKENS_PER_ITER: tl.constexpr, USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    # Which splits had work follows from the context length (a step input, set before the step), so it is
    # known before the wait and every partial is then loaded at once; an empty split's are not read.
    splits = tl.arange(0, NUM_SPLITS)
    iters = tl.cdiv(tl.load(context_lens_ptr + seq), TOKENS_PER_ITER)
    has_work = splits * tl.cdiv(iters, NUM_SPLITS) < iters
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    dims = tl.arange(0, HEAD_DIM)
    m = tl.load(part_max_ptr + seq * stride_pm_b + head * stride_pm_h + splits, mask=has_work, other=float("-inf"))
    sums = tl.load(part_sum_ptr + seq * stride_pm_b + head * stride_pm_h + splits, mask=has_work, other=0.0)
    acc = tl.load(part_out_ptr + seq * stride_po_b + head * stride_po_h + splits[:, None] * stride_po_s
                  + dims[None, :], mask=has_work[:, None], other=0.0)
    w = tl.where(has_work, tl.exp(m - tl.max(m, 0)), 0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(sums * w, 0)
    tl.store(out_ptr + seq * stride_o_b + head * stride_o_h + dims, out.to(out_ptr.dtype.element_ty))


def decode_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Context splits per sequence so that batch * kv_heads * splits covers the GPU about twice."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (2 * num_sms) // max(1, batch * num_kv_heads))
    splits = 1
    while splits * 2 <= min(want, 32):
        splits *= 2
    return splits


def supports(block_size: int, head_dim: int) -> bool:
    """Shapes the kernel handles (tl.arange needs powers of 2; tl.dot at least 16)."""
    return _is_pow2(block_size) and _is_pow2(head_dim) and head_dim >= 16


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class DecodeAttentionWorkspace:
    """Partial-result buffers, allocated once per (max batch, heads, splits) so graphs can reuse them.
    `dependent_launch`: launch both kernels with programmatic dependent launch (compute capability 9.0+;
    see `triton_gemv.linear`)."""

    def __init__(self, max_batch: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device,
                 dependent_launch: bool = False) -> None:
        self.num_splits = num_splits
        self.dependent_launch = dependent_launch
        self.part_out = torch.empty(max_batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        self.part_max = torch.empty(max_batch, num_heads, num_splits, dtype=torch.float32, device=device)
        self.part_sum = torch.empty(max_batch, num_heads, num_splits, dtype=torch.float32, device=device)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           workspace: DecodeAttentionWorkspace) -> torch.Tensor:
    """q: [B, Hq, D]; caches [blocks, block_size, Hkv, D]; block_tables [B, W] int32; context_lens [B] int32.
    Every context length must be >= 1; block_size and head_dim must be powers of 2. Returns [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = workspace.num_splits
    # Enough tokens per iteration to feed tl.dot (>= 16 rows) without over-reading short contexts.
    blocks_per_iter = max(1, 32 // block_size)
    out = torch.empty_like(q)
    pdl = {"launch_pdl": True} if workspace.dependent_launch else {}
    _decode_partial_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        workspace.part_out, workspace.part_max, workspace.part_sum,
        scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        workspace.part_out.stride(0), workspace.part_out.stride(1), workspace.part_out.stride(2),
        workspace.part_max.stride(0), workspace.part_max.stride(1),
        NUM_SPLITS=splits, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCKS_PER_ITER=blocks_per_iter,
        # float32 must stay float32: Triton's default for a float32 dot is TF32 (~1e-3 error).
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        USE_PDL=workspace.dependent_launch, num_warps=4, **pdl,
    )
    _decode_merge_kernel[(batch, num_heads)](
        workspace.part_out, workspace.part_max, workspace.part_sum, out, context_lens,
        workspace.part_out.stride(0), workspace.part_out.stride(1), workspace.part_out.stride(2),
        workspace.part_max.stride(0), workspace.part_max.stride(1),
        out.stride(0), out.stride(1),
        NUM_SPLITS=splits, HEAD_DIM=head_dim, TOKENS_PER_ITER=block_size * blocks_per_iter,
        USE_PDL=workspace.dependent_launch, num_warps=1, **pdl,
    )
    return out

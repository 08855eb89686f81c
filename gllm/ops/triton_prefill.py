"""Triton paged attention for prefill chunks: many query tokens per sequence, K/V through block tables.

One program computes a tile of BLOCK_M query rows of one sequence for one head, streaming the
sequence's keys (cached prefix and this chunk alike) block by block with an online softmax, up to
the tile's causal bound. Query row i of a chunk sits at absolute position (context - chunk + i).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gllm.ops.triton_attention import attend_block

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr,
    tile_seq_ptr, tile_row_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
    scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_block, stride_kc_tok, stride_kc_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(q_start_ptr + seq)
    q_len = tl.load(q_len_ptr + seq)
    ctx = tl.load(ctx_len_ptr + seq)
    prefix = ctx - q_len

    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    tokens_q = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens_q[:, None] * stride_q_t + head * stride_q_h + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    q_pos = prefix + rows
    end = tl.minimum(ctx, prefix + row0 + BLOCK_M)      # keys past the tile's last row are never visible

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs = tl.arange(0, BLOCK_N)
    for n0 in range(0, end, BLOCK_N):
        tok = n0 + offs
        tok_ok = tok < end
        block = tl.load(block_tables_ptr + seq * stride_bt + tok // BLOCK_SIZE, mask=tok_ok, other=0)
        kv_off = block.to(tl.int64) * stride_kc_block + (tok % BLOCK_SIZE) * stride_kc_tok + kv_head * stride_kc_head
        visible = (tok[None, :] <= q_pos[:, None]) & tok_ok[None, :]
        m_i, l_i, acc = attend_block(q, k_cache_ptr, v_cache_ptr, kv_off, dims, tok_ok, visible,
                                     m_i, l_i, acc, scale, DOT_PRECISION)
    acc = acc / l_i[:, None]
    tl.store(out_ptr + tokens_q[:, None] * stride_o_t + head * stride_o_h + dims[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


class PrefillPlan:
    """The tiles of one step's prefill chunks, on the device (built once per step, used by every layer)."""

    def __init__(self, seqs: list[int], query_starts: list[int], query_lens: list[int], context_lens: list[int],
                 device: torch.device) -> None:
        tile_seq, tile_row = [], []
        for i in seqs:
            for row in range(0, query_lens[i], BLOCK_M):
                tile_seq.append(i)
                tile_row.append(row)
        self.num_tiles = len(tile_seq)
        self.tiles = torch.tensor([tile_seq, tile_row], dtype=torch.int32).to(device, non_blocking=True)
        self.per_seq = torch.tensor([query_starts, query_lens, context_lens], dtype=torch.int32).to(
            device, non_blocking=True)


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                            block_tables: torch.Tensor, plan: PrefillPlan, scale: float) -> None:
    """Attention for the plan's prefill chunks; writes their rows of `out` ([T, Hq, D])."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _prefill_kernel[(plan.num_tiles, num_heads)](
        q, k_cache, v_cache, out, block_tables,
        plan.tiles[0], plan.tiles[1], plan.per_seq[0], plan.per_seq[1], plan.per_seq[2],
        scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )

"""Triton paged attention for prefill chunks: many query tokens per sequence, K/V through block tables.

One program computes a tile of BLOCK_M query rows of one sequence for one head, streaming the
sequence's keys (cached prefix and this chunk alike) block by block with an online softmax, up to
the tile's causal bound. Query row i of a chunk sits at absolute position (context - chunk + i).

A short chunk over a long cached prefix is only a few tiles: each program's walk over the keys is a
chain of dependent loads, and too few programs leave most of the GPU idle. Such steps split each
tile's keys over NUM_SPLITS programs (as flash-decoding does) and a second kernel merges the partial
softmaxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gllm.ops.triton_attention import attend_block
from gllm.transfer import to_device

BLOCK_M = 64
BLOCK_N = 64


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr,
    tile_seq_ptr, tile_row_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr,
    scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_block, stride_kc_tok, stride_kc_head, stride_bt,
    part_out_ptr, part_max_ptr, part_sum_ptr, num_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
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
    per_split = tl.cdiv(tl.cdiv(end, BLOCK_N), NUM_SPLITS) * BLOCK_N
    lo = split * per_split
    for n0 in range(lo, tl.minimum(lo + per_split, end), BLOCK_N):
        tok = n0 + offs
        tok_ok = tok < end
        block = tl.load(block_tables_ptr + seq * stride_bt + tok // BLOCK_SIZE, mask=tok_ok, other=0)
        kv_off = block.to(tl.int64) * stride_kc_block + (tok % BLOCK_SIZE) * stride_kc_tok + kv_head * stride_kc_head
        visible = (tok[None, :] <= q_pos[:, None]) & tok_ok[None, :]
        m_i, l_i, acc = attend_block(q, k_cache_ptr, v_cache_ptr, kv_off, dims, tok_ok, visible,
                                     m_i, l_i, acc, scale, DOT_PRECISION)
    if NUM_SPLITS == 1:
        acc = acc / l_i[:, None]
        tl.store(out_ptr + tokens_q[:, None] * stride_o_t + head * stride_o_h + dims[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:   # partial results, [tile, head, split, row(, dim)], merged by _prefill_merge_kernel
        local = tl.arange(0, BLOCK_M)
        part = ((tile * num_heads + head) * NUM_SPLITS + split).to(tl.int64) * BLOCK_M
        tl.store(part_out_ptr + (part + local[:, None]) * HEAD_DIM + dims[None, :], acc)
        tl.store(part_max_ptr + part + local, m_i)
        tl.store(part_sum_ptr + part + local, l_i)


@triton.jit
def _prefill_merge_kernel(
    out_ptr, tile_seq_ptr, tile_row_ptr, q_start_ptr, q_len_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    stride_o_t, stride_o_h, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(q_len_ptr + seq)
    tokens_q = (tl.load(q_start_ptr + seq) + rows).to(tl.int64)
    local = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    base = (tile * num_heads + head).to(tl.int64) * NUM_SPLITS * BLOCK_M
    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        m_all = tl.maximum(m_all, tl.load(part_max_ptr + base + s * BLOCK_M + local))
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        # A split whose keys a row cannot see (all past its position, or none) holds m = -inf and NaN sums
        # for that row: it must weigh exactly 0.
        m = tl.load(part_max_ptr + base + s * BLOCK_M + local)
        seen = m != float("-inf")
        w = tl.where(seen, tl.exp(m - m_all), 0.0)
        total += tl.where(seen, tl.load(part_sum_ptr + base + s * BLOCK_M + local) * w, 0.0)
        part = tl.load(part_out_ptr + (base + s * BLOCK_M + local[:, None]) * HEAD_DIM + dims[None, :])
        acc += tl.where(seen[:, None], part * w[:, None], 0.0)
    tl.store(out_ptr + tokens_q[:, None] * stride_o_t + head * stride_o_h + dims[None, :],
             (acc / total[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@dataclass
class PrefillPlan:
    """The tiles of one step's prefill chunks, on the device (built once per step, used by every layer).

    A CUDA-graph step keeps one plan in static buffers sized for its worst case: tiles it does not need
    point at a sequence whose query length and context are 0, and do nothing.
    """
    num_tiles: int
    tiles: torch.Tensor      # [2, num_tiles] int32: the tile's sequence, its first query row
    per_seq: torch.Tensor    # [3, sequences] int32: first token in the flat batch, query length, context length
    num_splits: int = 1      # programs sharing each tile's keys; > 1 needs the partial buffers below
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, seqs: list[int], query_starts: list[int], query_lens: list[int], context_lens: list[int],
              num_heads: int, head_dim: int, device: torch.device) -> "PrefillPlan":
        tiles = tile_rows([(i, query_lens[i]) for i in seqs])
        splits = prefill_splits(len(tiles[0]), num_heads, max(context_lens[i] for i in seqs), device)
        return cls(len(tiles[0]), to_device(list(tiles), torch.int32, device),
                   to_device([query_starts, query_lens, context_lens], torch.int32, device), splits,
                   prefill_partials(len(tiles[0]), num_heads, head_dim, splits, device))


def prefill_splits(num_tiles: int, num_heads: int, max_context: int, device: torch.device) -> int:
    """Key splits per tile so that tiles * heads * splits covers the GPU about twice, each split keeping at
    least two key blocks."""
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = min((2 * num_sms) // max(1, num_tiles * num_heads), max_context // (2 * BLOCK_N), 8)
    splits = 1
    while splits * 2 <= want:
        splits *= 2
    return splits


def prefill_partials(num_tiles: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device):
    """The partial-softmax buffers of a split plan (None when it does not split)."""
    if num_splits == 1:
        return None
    rows = num_tiles * num_heads * num_splits * BLOCK_M
    return (torch.empty(rows, head_dim, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device),
            torch.empty(rows, dtype=torch.float32, device=device))


def tile_rows(chunks: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """(sequence, first row) of every BLOCK_M-row tile of the given (sequence index, query length) chunks."""
    tile_seq, tile_row = [], []
    for i, n in chunks:
        for row in range(0, n, BLOCK_M):
            tile_seq.append(i)
            tile_row.append(row)
    return tile_seq, tile_row


def max_tiles(num_tokens: int, num_seqs: int) -> int:
    """The most tiles `num_tokens` query rows split over at most `num_seqs` chunks can need."""
    return -(-num_tokens // BLOCK_M) + num_seqs - 1


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                            block_tables: torch.Tensor, plan: PrefillPlan, scale: float) -> None:
    """Attention for the plan's prefill chunks; writes their rows of `out` ([T, Hq, D])."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    splits = plan.num_splits
    part_out, part_max, part_sum = plan.partials if splits > 1 else (out, out, out)   # unused when not split
    _prefill_kernel[(plan.num_tiles, num_heads, splits)](
        q, k_cache, v_cache, out, block_tables,
        plan.tiles[0], plan.tiles[1], plan.per_seq[0], plan.per_seq[1], plan.per_seq[2],
        scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part_out, part_max, part_sum, num_heads,
        GROUP=num_heads // k_cache.shape[2], HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        NUM_SPLITS=splits, num_warps=4, num_stages=2,
    )
    if splits > 1:
        _prefill_merge_kernel[(plan.num_tiles, num_heads)](
            out, plan.tiles[0], plan.tiles[1], plan.per_seq[0], plan.per_seq[1], part_out, part_max, part_sum,
            out.stride(0), out.stride(1), num_heads,
            HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, NUM_SPLITS=splits, num_warps=4,
        )

"""Plain-PyTorch paged attention: runs on CPU and GPU, mixed prefill chunks and decodes in one call."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gllm.model.batch import ForwardBatch
from gllm.transfer import to_device


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V ([T, Hkv, D]) into their slots of the block pool ([blocks, block_size, Hkv, D])."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                    scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [T, Hq, D], flat and sequence-contiguous; the cache already holds this step's K/V.
    Decodes (one query each) share one padded SDPA call; each prefill chunk gets its own, so a
    long chunk never pads every decode up to its length.
    """
    if batch.decode_kernel is not None:
        from gllm.ops.triton_attention import paged_decode_attention
        return paged_decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale,
                                      batch.decode_kernel)
    if batch.prefill_plan is not None:
        from gllm.ops.triton_prefill import paged_prefill_attention
        out = torch.empty_like(q)
        paged_prefill_attention(q, k_cache, v_cache, out, batch.block_tables, batch.prefill_plan, scale)
        return out
    if batch.use_triton:
        return _triton_attention(q, k_cache, v_cache, batch, scale)
    out = torch.empty_like(q)
    starts, start = [], 0
    for n in batch.query_lens_host:
        starts.append(start)
        start += n
    decodes = [i for i, n in enumerate(batch.query_lens_host) if n == 1]
    groups = [decodes] if decodes else []
    groups += [[i] for i, n in enumerate(batch.query_lens_host) if n > 1]
    for seqs in groups:
        rows = torch.cat([torch.arange(starts[i], starts[i] + batch.query_lens_host[i]) for i in seqs])
        rows = rows.to(q.device)
        out[rows] = _attend(q, k_cache, v_cache, batch, seqs, rows, scale)
    return out


def _triton_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                      scale: float) -> torch.Tensor:
    """A mixed eager step on the GPU: prefill chunks through the prefill kernel, decodes through the decode kernel."""
    from gllm.ops.triton_attention import paged_decode_attention
    from gllm.ops.triton_prefill import paged_prefill_attention
    if batch.attention_plan is None:
        batch.attention_plan = _TritonPlan(batch, q, k_cache)
    plan = batch.attention_plan
    out = torch.empty_like(q)
    if plan.prefill is not None:
        paged_prefill_attention(q, k_cache, v_cache, out, batch.block_tables, plan.prefill, scale)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = paged_decode_attention(q[plan.decode_rows], k_cache, v_cache, plan.decode_tables,
                                                       plan.decode_ctx, scale, plan.workspace)
    return out


class _TritonPlan:
    """What the kernels need to know about one step's sequences, on the device once for all layers."""

    def __init__(self, batch: ForwardBatch, q: torch.Tensor, k_cache: torch.Tensor) -> None:
        from gllm.ops.triton_attention import DecodeAttentionWorkspace, decode_splits
        from gllm.ops.triton_prefill import PrefillPlan
        starts, start = [], 0
        for n in batch.query_lens_host:
            starts.append(start)
            start += n
        decodes = [i for i, n in enumerate(batch.query_lens_host) if n == 1]
        prefills = [i for i, n in enumerate(batch.query_lens_host) if n > 1]
        device = q.device
        self.prefill = PrefillPlan.build(prefills, starts, batch.query_lens_host, batch.context_lens_host,
                                          q.shape[1], q.shape[2], device) if prefills else None
        self.decode_rows = None
        if decodes:
            seqs = to_device(decodes, torch.int64, device)
            self.decode_rows = to_device([starts[i] for i in decodes], torch.int64, device)
            self.decode_tables = batch.block_tables[seqs].to(torch.int32)
            self.decode_ctx = batch.context_lens[seqs].to(torch.int32)
            self.workspace = DecodeAttentionWorkspace(len(decodes), q.shape[1], q.shape[2],
                                                      decode_splits(len(decodes), k_cache.shape[2], device), device)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
            seqs: list[int], rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention for sequences that all have the same query length (1, or a single prefill)."""
    n, q_len = len(seqs), batch.query_lens_host[seqs[0]]
    ctx_lens = [batch.context_lens_host[i] for i in seqs]
    max_ctx, block_size = max(ctx_lens), k_cache.shape[1]
    num_heads, head_dim = q.shape[1], q.shape[2]
    seq_index = to_device(seqs, torch.int64, q.device)
    tables = batch.block_tables[seq_index, : (max_ctx + block_size - 1) // block_size]
    keys = k_cache[tables].flatten(1, 2)[:, :max_ctx].transpose(1, 2)        # [n, Hkv, ctx, D]
    values = v_cache[tables].flatten(1, 2)[:, :max_ctx].transpose(1, 2)
    queries = q[rows].view(n, q_len, num_heads, head_dim).transpose(1, 2)    # [n, Hq, q_len, D]
    if n == 1 and ctx_lens[0] == q_len:
        mask, causal = None, True          # a whole prompt: plain causal attention
    else:
        # Query i sits at position ctx - q_len + i and sees keys 0..that position.
        ctx = to_device(ctx_lens, torch.int64, q.device)
        q_pos = (ctx - q_len)[:, None] + torch.arange(q_len, device=q.device)[None, :]
        mask = torch.arange(max_ctx, device=q.device)[None, None, :] <= q_pos[:, :, None]
        mask, causal = mask[:, None], False
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=keys.shape[1] != num_heads)
    return out.transpose(1, 2).reshape(n * q_len, num_heads, head_dim)

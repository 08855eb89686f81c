"""Paged attention over the KV block pools, chosen by the step's typed plan.

A step's `AttentionPlan` is built once by the model runner (not by whichever layer runs first) and
says which kernels every layer uses: plain PyTorch SDPA (CPU and GPU), the Triton decode kernel
(decode steps and their CUDA graphs), the Triton prefill kernel (prefill graphs), or both Triton
kernels for an eager mixed step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F

from gllm.transfer import to_device

if TYPE_CHECKING:   # Triton is optional: these types exist only where it is installed
    from gllm.ops.triton_attention import DecodeAttentionWorkspace
    from gllm.ops.triton_prefill import PrefillPlan


@dataclass
class SdpaPlan:
    """Plain PyTorch: the step's query and context lengths on the host, so grouping costs no device sync.
    What every layer would compute alike (rows, block tables, masks) is built at the first layer."""
    query_lens: list[int]
    context_lens: list[int]
    float32: bool = False              # compute in float32 whatever q's dtype (on the CPU: see the fast path)
    groups: list[_SdpaGroup] | None = None


@dataclass
class _SdpaGroup:
    """Sequences sharing one SDPA call: all the decodes, or one prefill chunk."""
    rows: torch.Tensor | None          # their rows of the flat batch; None: all rows, in order
    tables: torch.Tensor               # [n, blocks] their block tables, cut to the longest context
    max_ctx: int
    q_len: int
    mask: torch.Tensor | None          # [n, 1, q_len, max_ctx] or None (plain causal)


@dataclass
class DecodeKernelPlan:
    """One query token per sequence through the Triton decode kernel (shapes fixed by the batch size)."""
    workspace: DecodeAttentionWorkspace


@dataclass
class PrefillKernelPlan:
    """Prefill chunks only, through the Triton prefill kernel (a replayed prefill graph's static plan)."""
    prefill: PrefillPlan


@dataclass
class MixedKernelPlan:
    """An eager GPU step mixing prefill chunks and decodes: each part through its Triton kernel."""
    prefill: PrefillPlan | None
    decode_rows: torch.Tensor | None = None      # [D] the decodes' rows of the flat batch
    decode_tables: torch.Tensor | None = None    # [D, width] int32
    decode_ctx: torch.Tensor | None = None       # [D] int32
    workspace: DecodeAttentionWorkspace | None = None

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor,
              context_lens_device: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> MixedKernelPlan:
        from gllm.ops.triton_attention import DecodeAttentionWorkspace, decode_splits
        from gllm.ops.triton_prefill import PrefillPlan
        device = block_tables.device
        starts = _starts(query_lens)
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        prefills = [i for i, n in enumerate(query_lens) if n > 1]
        plan = cls(PrefillPlan.build(prefills, starts, query_lens, context_lens, num_heads, head_dim, device)
                   if prefills else None)
        if decodes:
            seqs = to_device(decodes, torch.int64, device)
            plan.decode_rows = to_device([starts[i] for i in decodes], torch.int64, device)
            plan.decode_tables = block_tables[seqs].to(torch.int32)
            plan.decode_ctx = context_lens_device[seqs].to(torch.int32)
            plan.workspace = DecodeAttentionWorkspace(len(decodes), num_heads, head_dim,
                                                      decode_splits(len(decodes), num_kv_heads, device), device)
        return plan


AttentionPlan = Union[SdpaPlan, DecodeKernelPlan, PrefillKernelPlan, MixedKernelPlan]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, plan: AttentionPlan, scale: float) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached context.

    q: [T, Hq, D], flat and sequence-contiguous; the cache already holds this step's K/V.
    block_tables [B, width] and context_lens [B] (after this step) address each sequence's blocks.
    """
    if isinstance(plan, DecodeKernelPlan):
        from gllm.ops.triton_attention import paged_decode_attention
        return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, plan.workspace)
    if isinstance(plan, PrefillKernelPlan):
        from gllm.ops.triton_prefill import paged_prefill_attention
        out = torch.empty_like(q)
        paged_prefill_attention(q, k_cache, v_cache, out, block_tables, plan.prefill, scale)
        return out
    if isinstance(plan, MixedKernelPlan):
        return _mixed_attention(q, k_cache, v_cache, block_tables, plan, scale)
    return _sdpa_attention(q, k_cache, v_cache, block_tables, plan, scale)


def _starts(query_lens: list[int]) -> list[int]:
    starts, start = [], 0
    for n in query_lens:
        starts.append(start)
        start += n
    return starts


def _sdpa_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    plan: SdpaPlan, scale: float) -> torch.Tensor:
    """Decodes (one query each) share one padded SDPA call; each prefill chunk gets its own, so a long chunk
    never pads every decode up to its length."""
    if plan.groups is None:
        plan.groups = _sdpa_groups(plan, block_tables, k_cache.shape[1], q.shape[0], q.device)
    if len(plan.groups) == 1 and plan.groups[0].rows is None:
        return _attend(q, k_cache, v_cache, plan.groups[0], scale, plan.float32)
    out = torch.empty_like(q)
    for group in plan.groups:
        out[group.rows] = _attend(q[group.rows], k_cache, v_cache, group, scale, plan.float32)
    return out


def _sdpa_groups(plan: SdpaPlan, block_tables: torch.Tensor, block_size: int, num_rows: int,
                 device: torch.device) -> list[_SdpaGroup]:
    starts = _starts(plan.query_lens)
    decodes = [i for i, n in enumerate(plan.query_lens) if n == 1]
    members = [decodes] if decodes else []
    members += [[i] for i, n in enumerate(plan.query_lens) if n > 1]
    groups = []
    for seqs in members:
        q_len = plan.query_lens[seqs[0]]
        ctx_lens = [plan.context_lens[i] for i in seqs]
        max_ctx = max(ctx_lens)
        row_ids = [r for i in seqs for r in range(starts[i], starts[i] + q_len)]
        rows = None if row_ids == list(range(num_rows)) else to_device(row_ids, torch.int64, device)
        tables = block_tables[to_device(seqs, torch.int64, device), : (max_ctx + block_size - 1) // block_size]
        mask = None
        if not (len(seqs) == 1 and ctx_lens[0] == q_len):   # else a whole prompt: plain causal attention
            # Query i sits at position ctx - q_len + i and sees keys 0..that position.
            ctx = to_device(ctx_lens, torch.int64, device)
            q_pos = (ctx - q_len)[:, None] + torch.arange(q_len, device=device)[None, :]
            mask = (torch.arange(max_ctx, device=device)[None, None, :] <= q_pos[:, :, None])[:, None]
        groups.append(_SdpaGroup(rows, tables, max_ctx, q_len, mask))
    return groups


def _mixed_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     plan: MixedKernelPlan, scale: float) -> torch.Tensor:
    from gllm.ops.triton_attention import paged_decode_attention
    from gllm.ops.triton_prefill import paged_prefill_attention
    out = torch.empty_like(q)
    if plan.prefill is not None:
        paged_prefill_attention(q, k_cache, v_cache, out, block_tables, plan.prefill, scale)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = paged_decode_attention(q[plan.decode_rows], k_cache, v_cache, plan.decode_tables,
                                                       plan.decode_ctx, scale, plan.workspace)
    return out


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V ([T, Hkv, D]) into their slots of the block pool ([blocks, block_size, Hkv, D])."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: _SdpaGroup,
            scale: float, float32: bool = False) -> torch.Tensor:
    """Attention for one group's query rows `q` ([n * q_len, Hq, D]), in float32 if `float32`."""
    n, q_len, max_ctx = group.tables.shape[0], group.q_len, group.max_ctx
    num_heads, head_dim = q.shape[1], q.shape[2]
    dtype = torch.float32 if float32 else q.dtype
    keys = k_cache[group.tables].flatten(1, 2)[:, :max_ctx].to(dtype).transpose(1, 2)   # [n, Hkv, ctx, D]
    values = v_cache[group.tables].flatten(1, 2)[:, :max_ctx].to(dtype).transpose(1, 2)
    queries = q.view(n, q_len, num_heads, head_dim).to(dtype).transpose(1, 2)          # [n, Hq, q_len, D]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask, is_causal=group.mask is None,
                                         scale=scale, enable_gqa=keys.shape[1] != num_heads)
    return out.transpose(1, 2).reshape(n * q_len, num_heads, head_dim).to(q.dtype)

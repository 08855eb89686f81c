"""Fused Triton kernels for the GPU path: each replaces a chain of small PyTorch kernels.

A batch-1 decode step of a 1B model is otherwise ~700 launches, most of them 1-2 µs elementwise
ops (RMSNorm is seven, RoPE a dozen); these bring a layer down to about a dozen launches.
Numerics follow the reference: RMSNorm normalises in float32 and scales in the model dtype; a
residual sum is rounded to the model dtype before it is normalised, as the unfused code does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)   # rounded like the unfused add
        tl.store(residual_ptr + row * stride_r + cols, x, mask=ok)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * stride_o + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of x (or, with `residual`, of x + residual, which is written back into `residual`)."""
    rows, cols = x.shape
    out = torch.empty_like(x)
    if rows:
        _rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, x.stride(0),
                                  residual.stride(0) if residual is not None else 0, out.stride(0), cols, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(cols),
                                  num_warps=4 if cols <= 4096 else 8)
    return out


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=ok, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + n_cols + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)                # rounded like F.silu's output
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a [T, 2I] tensor holding gate and up side by side."""
    rows, width = gate_up.shape
    half = width // 2
    out = torch.empty(rows, half, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(half, block))](gate_up, out, gate_up.stride(0), out.stride(0), half,
                                                          BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, slots_ptr, k_cache_ptr, v_cache_ptr,
                       stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_cs,
                       stride_c_slot, stride_c_h,
                       NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:   # the next kernel may launch now: before its own wait it reads nothing this one writes
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token)
    slot = tl.load(slots_ptr + token)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cs + d)
    sin = tl.load(sin_ptr + pos * stride_cs + d)
    if USE_PDL:   # the tables and the step's positions and slots (copied in, not computed) before the wait
        tl.extra.cuda.gdc_wait()

    qh = tl.arange(0, Q_HEADS_PAD)
    q_ok = (qh < NUM_Q_HEADS)[:, None]
    q_base = q_ptr + token * stride_q_t + qh[:, None] * stride_q_h + d[None, :]
    q1 = tl.load(q_base, mask=q_ok, other=0.0)
    q2 = tl.load(q_base + HALF, mask=q_ok, other=0.0)
    c = cos.to(q1.dtype).to(tl.float32)[None, :]
    s = sin.to(q1.dtype).to(tl.float32)[None, :]
    tl.store(q_base, (q1.to(tl.float32) * c - q2.to(tl.float32) * s).to(q1.dtype), mask=q_ok)
    tl.store(q_base + HALF, (q2.to(tl.float32) * c + q1.to(tl.float32) * s).to(q1.dtype), mask=q_ok)

    kh = tl.arange(0, KV_HEADS_PAD)
    k_ok = (kh < NUM_KV_HEADS)[:, None]
    k_base = k_ptr + token * stride_k_t + kh[:, None] * stride_k_h + d[None, :]
    k1 = tl.load(k_base, mask=k_ok, other=0.0)
    k2 = tl.load(k_base + HALF, mask=k_ok, other=0.0)
    cache = slot.to(tl.int64) * stride_c_slot + kh[:, None] * stride_c_h + d[None, :]
    tl.store(k_cache_ptr + cache, (k1.to(tl.float32) * c - k2.to(tl.float32) * s).to(k1.dtype), mask=k_ok)
    tl.store(k_cache_ptr + cache + HALF, (k2.to(tl.float32) * c + k1.to(tl.float32) * s).to(k1.dtype), mask=k_ok)
    v_base = v_ptr + token * stride_v_t + kh[:, None] * stride_v_h + d[None, :]
    tl.store(v_cache_ptr + cache, tl.load(v_base, mask=k_ok, other=0.0), mask=k_ok)
    tl.store(v_cache_ptr + cache + HALF, tl.load(v_base + HALF, mask=k_ok, other=0.0), mask=k_ok)


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, dependent_launch: bool = False) -> None:
    """Rotate q in place; rotate k and store it and v into their cache slots. `dependent_launch`: as
    `triton_gemv.linear`'s (positions and slots must then come from a copy, not a kernel of the step).

    q: [T, Hq, D], k/v: [T, Hkv, D] (views with unit stride in D); cos/sin: [positions, D] float32
    tables (rotate-half layout, both halves equal); caches: [blocks, block_size, Hkv, D].
    """
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if not tokens:
        return
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    _rope_cache_kernel[(tokens,)](
        q, k, v, cos, sin, positions, slot_mapping, flat_k, flat_v,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        flat_k.stride(0), flat_k.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
        Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        USE_PDL=dependent_launch, num_warps=4, **({"launch_pdl": True} if dependent_launch else {}))

"""Decode-sized matmuls (a handful of rows) as one Triton kernel that streams the weight once.

At batch 1 a linear layer reads its whole weight to produce one row, so its time is the weight's
bytes over memory bandwidth; cuBLAS's GEMV gets 45-90% of a copy's byte rate on an H100 (the small
matrices worst), and the RMSNorm before it, the SiLU·mul after gate_up and the residual add after
o/down are separate launches that each cost more than their bytes. Here every program recomputes
the norm from the (L2-resident) input rows and applies the epilogue to its own output columns, so
a layer's matmuls take four launches with nothing in between.

Each program owns a few output columns over the whole of K (no split-K): two columns a program
still make ~1000 programs for N = 2048, every sum has one fixed order, and the result is bitwise
reproducible without atomics or a second reduction pass. Every loaded weight tile serves all the
rows: the FMA kernel (up to four rows; the default for one or two) keeps an fp32 accumulator per
row in the tile's own layout, so its loop is loads and FMAs with one reduction at the end; from
three rows on (two for gate_up) padding the rows to 16 for tl.dot on the tensor cores was faster.

Numerics follow the unfused chain: the norm is `_rms_norm_kernel`'s (normalise in float32, round,
scale in float32, round), the product accumulates in float32 and is rounded to the model dtype as
a linear's output would be, and the SiLU·mul and residual epilogues round each step as
`triton_fused` does. A float32 output (the logits) is the rounded result widened.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 16          # callers use F.linear for more rows, where the matmul is no longer a GEMV


class RopeKV(NamedTuple):
    """Where a q/k/v projection's epilogue puts its output: RoPE on q and k, k and v into their cache slots.

    The kernel then pairs each output column d < head_dim/2 of a head with d + head_dim/2 (the
    rotate-half partner) in one program, so the rotation needs no second pass over the output."""
    cos: torch.Tensor            # [positions, head_dim] float32, rotate-half layout (both halves equal)
    sin: torch.Tensor
    positions: torch.Tensor      # [M] int64, each row's position
    slots: torch.Tensor          # [M] int64, each row's KV slot
    k_cache: torch.Tensor        # [slots, kv_heads, head_dim], contiguous
    v_cache: torch.Tensor
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


class GemvConfig(NamedTuple):
    block_n: int       # output columns per program
    block_k: int       # K elements per loop step (a multiple of 8: 16-byte loads along K)
    num_warps: int
    num_stages: int
    dot: bool = False  # rows padded to 16 through tl.dot (tensor cores) instead of FMAs


@triton.jit
def _row_scale(x_ptr, rows, m_ok, stride_xm, K, eps, BLOCK_K: tl.constexpr):
    """1 / rms of each row, [R, 1], by _rms_norm_kernel's formula (the fp32 sum runs in another order)."""
    sq = tl.zeros([rows.shape[0], BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        xf = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & (ks < K)[None, :],
                     other=0.0).to(tl.float32)
        sq += xf * xf
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=1) / K + eps)
    return tl.where(m_ok, inv, 0.0)[:, None]                           # padded rows stay 0, not NaN


@triton.jit
def _x_tile(x_ptr, rows, m_ok, stride_xm, ks, K, norm_ptr, inv, EVEN_K: tl.constexpr, HAS_NORM: tl.constexpr):
    """x[rows, ks] as the linear sees it: [R, BLOCK_K] in x's dtype, RMS-normed if HAS_NORM."""
    if EVEN_K:
        mask = m_ok[:, None]
    else:
        mask = m_ok[:, None] & (ks < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)
    if HAS_NORM:   # _rms_norm_kernel's rounding: normalise in fp32, round, scale in fp32, round
        nw = tl.load(norm_ptr + ks, mask=ks < K, other=0.0)
        normed = (x.to(tl.float32) * inv).to(x.dtype)
        x = (nw.to(tl.float32)[None, :] * normed.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _epilogue(ya, yb, r, out_ptr, rows, m_ok, offs_n, n_ok, stride_om, HAS_RESIDUAL: tl.constexpr,
              SILU_MUL: tl.constexpr, dtype: tl.constexpr):
    """Round the fp32 sums [R, BLOCK_N] like a linear's output, apply the epilogue and store (`r`: the
    residual, loaded by `_epilogue_inputs`)."""
    y = ya.to(dtype)
    if SILU_MUL:   # as _silu_mul_kernel on the rounded gate and up
        g = y.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype)
        y = (silu.to(tl.float32) * yb.to(dtype).to(tl.float32)).to(dtype)
    mask = m_ok[:, None] & n_ok[None, :]
    ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    if HAS_RESIDUAL:   # out is the residual, updated in place: no other program touches these columns
        y = (r.to(tl.float32) + y.to(tl.float32)).to(dtype)
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_inputs(rows, m_ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype: tl.constexpr,
                 ROPE: tl.constexpr, HALF: tl.constexpr):
    """The RoPE epilogue's cos, sin [R, BLOCK_N] and K/V slots [R]. Positions and slots are the step's inputs,
    set before it and written by none of its kernels: loaded before the dependent-launch wait, so their
    latency hides behind the kernel before instead of adding to the end of this one."""
    c = 0.0
    s = 0.0
    slot = 0
    if ROPE:
        mask = m_ok[:, None] & n_ok[None, :]
        pos = tl.load(pos_ptr + rows, mask=m_ok, other=0)
        table = pos[:, None] * stride_cs + (offs_n % HALF)[None, :]
        c = tl.load(cos_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s = tl.load(sin_ptr + table, mask=mask, other=0.0).to(dtype).to(tl.float32)
        slot = tl.load(slot_ptr + rows, mask=m_ok, other=0).to(tl.int64)
    return c, s, slot


@triton.jit
def _residual(out_ptr, rows, m_ok, offs_n, n_ok, stride_om, HAS_RESIDUAL: tl.constexpr):
    """The residual the epilogue adds to, loaded right after the wait (the kernel before wrote it), ahead of
    the K loop, so its latency overlaps the loop's instead of following it."""
    r = 0.0
    if HAS_RESIDUAL:
        r = tl.load(out_ptr + rows[:, None] * stride_om + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                    other=0.0)
    return r


@triton.jit
def _rope_epilogue(ya, yb, c, s, slot, q_ptr, rows, m_ok, offs_n, n_ok, stride_qm,
                   k_cache_ptr, v_cache_ptr, stride_c_slot, dtype: tl.constexpr,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr):
    """Column pairs (d, d + HALF) of the q/k/v output [R, BLOCK_N pairs], rounded like a linear's output,
    then as `triton_fused.rope_and_write_kv`: q rotated into q_ptr, k rotated and v as is into their slots
    (cos, sin and slots from `_rope_inputs`)."""
    lo = ya.to(dtype).to(tl.float32)
    hi = yb.to(dtype).to(tl.float32)
    head = offs_n // HALF
    d = offs_n % HALF
    mask = m_ok[:, None] & n_ok[None, :]
    is_q = (head < NUM_Q_HEADS)[None, :]
    is_v = (head >= NUM_Q_HEADS + NUM_KV_HEADS)[None, :]
    out_lo = tl.where(is_v, lo, lo * c - hi * s).to(dtype)
    out_hi = tl.where(is_v, hi, hi * c + lo * s).to(dtype)
    q_off = rows[:, None] * stride_qm + (head * (2 * HALF) + d)[None, :]
    tl.store(q_ptr + q_off, out_lo, mask=mask & is_q)
    tl.store(q_ptr + q_off + HALF, out_hi, mask=mask & is_q)
    kv_head = tl.where(is_v, head[None, :] - (NUM_Q_HEADS + NUM_KV_HEADS), head[None, :] - NUM_Q_HEADS)
    c_off = slot[:, None] * stride_c_slot + kv_head * (2 * HALF) + d[None, :]
    is_k = ~is_q & ~is_v
    tl.store(k_cache_ptr + c_off, out_lo, mask=mask & is_k)
    tl.store(k_cache_ptr + c_off + HALF, out_hi, mask=mask & is_k)
    tl.store(v_cache_ptr + c_off, out_lo, mask=mask & is_v)
    tl.store(v_cache_ptr + c_off + HALF, out_hi, mask=mask & is_v)


@triton.jit
def _weight_rows(w_ptr, offs_n, stride_wn, ROPE: tl.constexpr, HALF: tl.constexpr):
    """Row pointers of the weight for output columns offs_n ([BLOCK_N, 1]); with ROPE offs_n counts
    (d, d + HALF) pairs and these are the rows of each pair's first column."""
    if ROPE:
        offs_n = (offs_n // HALF) * (2 * HALF) + offs_n % HALF
    return w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn             # lm_head has ~1e9 elements


@triton.jit
def _store(ya, yb, pre, out_ptr, rows, m_ok, offs_n, n_ok, stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot,
           dtype: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr, ROPE: tl.constexpr,
           NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr):
    """The epilogue; `pre` = (residual, cos, sin, slots), what `_residual` and `_rope_inputs` loaded early."""
    r, c, s, slot = pre
    if ROPE:
        _rope_epilogue(ya, yb, c, s, slot, out_ptr, rows, m_ok, offs_n, n_ok, stride_om, k_cache_ptr, v_cache_ptr,
                       stride_c_slot, dtype, NUM_Q_HEADS, NUM_KV_HEADS, HALF)
    else:
        _epilogue(ya, yb, r, out_ptr, rows, m_ok, offs_n, n_ok, stride_om, HAS_RESIDUAL, SILU_MUL, dtype)


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, norm_ptr, out_ptr, N, K, up_offset, stride_xm, stride_wn, stride_om, eps,
                      cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_c_slot,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                      ROPE: tl.constexpr, PAIRED: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                      NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr):
    """1 to 4 rows, each with its own [BLOCK_N, BLOCK_K] accumulator in the weight tile's layout, so the
    loop is loads and FMAs with no layout shuffles; the reduction over K happens once, at the end."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = _weight_rows(w_ptr, offs_n, stride_wn, ROPE, HALF)
    r0 = tl.arange(0, 1)
    r1 = r0 + 1
    r2 = r0 + 2
    r3 = r0 + 3
    ok = r0 < 1                                                         # ROWS is exact: every row is real
    # The loop loads the weight one step ahead, and the first step is issued before the row norms,
    # so HBM is busy from the start and while each step's FMAs run.
    if USE_PDL:   # the next kernel may launch now: before its own wait it reads nothing this step writes
        tl.extra.cuda.gdc_launch_dependents()
    ks = tl.arange(0, BLOCK_K)
    wa_next = tl.load(w_rows + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :], other=0.0,
                      eviction_policy="evict_first")
    wb_next = wa_next
    if PAIRED:
        wb_next = tl.load(w_rows + up_offset * stride_wn + ks[None, :], mask=n_ok[:, None] & (ks < K)[None, :],
                          other=0.0, eviction_policy="evict_first")
    rope0 = _rope_inputs(r0, ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype, ROPE, HALF)
    if ROWS > 1:
        rope1 = _rope_inputs(r1, ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype, ROPE, HALF)
    if ROWS > 2:
        rope2 = _rope_inputs(r2, ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype, ROPE, HALF)
    if ROWS > 3:
        rope3 = _rope_inputs(r3, ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype, ROPE, HALF)
    if USE_PDL:   # the weights and the step's inputs never change in a step: only now wait for the kernel before
        tl.extra.cuda.gdc_wait()
    pre0 = (_residual(out_ptr, r0, ok, offs_n, n_ok, stride_om, HAS_RESIDUAL),) + rope0
    if ROWS > 1:
        pre1 = (_residual(out_ptr, r1, ok, offs_n, n_ok, stride_om, HAS_RESIDUAL),) + rope1
    if ROWS > 2:
        pre2 = (_residual(out_ptr, r2, ok, offs_n, n_ok, stride_om, HAS_RESIDUAL),) + rope2
    if ROWS > 3:
        pre3 = (_residual(out_ptr, r3, ok, offs_n, n_ok, stride_om, HAS_RESIDUAL),) + rope3
    inv0 = 0.0
    inv1 = 0.0
    inv2 = 0.0
    inv3 = 0.0
    if HAS_NORM:   # every program recomputes the row norms: K is small and x sits in L2
        inv0 = _row_scale(x_ptr, r0, ok, stride_xm, K, eps, BLOCK_K)
        if ROWS > 1:
            inv1 = _row_scale(x_ptr, r1, ok, stride_xm, K, eps, BLOCK_K)
        if ROWS > 2:
            inv2 = _row_scale(x_ptr, r2, ok, stride_xm, K, eps, BLOCK_K)
        if ROWS > 3:
            inv3 = _row_scale(x_ptr, r3, ok, stride_xm, K, eps, BLOCK_K)
    a0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    a1 = a0
    a2 = a0
    a3 = a0
    b0 = a0                                                             # b*: the up half (SILU_MUL)
    b1 = a0
    b2 = a0
    b3 = a0

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        wa = wa_next.to(tl.float32)
        wb = wb_next.to(tl.float32)
        ahead = ks + BLOCK_K
        w_mask = n_ok[:, None] & (ahead < K)[None, :]                  # all off on the last step: no traffic
        wa_next = tl.load(w_rows + ahead[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        if PAIRED:
            wb_next = tl.load(w_rows + up_offset * stride_wn + ahead[None, :], mask=w_mask, other=0.0,
                              eviction_policy="evict_first")
        x = _x_tile(x_ptr, r0, ok, stride_xm, ks, K, norm_ptr, inv0, EVEN_K, HAS_NORM).to(tl.float32)
        a0 += wa * x
        if PAIRED:
            b0 += wb * x
        if ROWS > 1:
            x = _x_tile(x_ptr, r1, ok, stride_xm, ks, K, norm_ptr, inv1, EVEN_K, HAS_NORM).to(tl.float32)
            a1 += wa * x
            if PAIRED:
                b1 += wb * x
        if ROWS > 2:
            x = _x_tile(x_ptr, r2, ok, stride_xm, ks, K, norm_ptr, inv2, EVEN_K, HAS_NORM).to(tl.float32)
            a2 += wa * x
            if PAIRED:
                b2 += wb * x
        if ROWS > 3:
            x = _x_tile(x_ptr, r3, ok, stride_xm, ks, K, norm_ptr, inv3, EVEN_K, HAS_NORM).to(tl.float32)
            a3 += wa * x
            if PAIRED:
                b3 += wb * x

    _store(tl.sum(a0, axis=1)[None, :], tl.sum(b0, axis=1)[None, :], pre0, out_ptr, r0, ok, offs_n, n_ok,
           stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot, dtype, HAS_RESIDUAL, SILU_MUL, ROPE, NUM_Q_HEADS,
           NUM_KV_HEADS, HALF)
    if ROWS > 1:
        _store(tl.sum(a1, axis=1)[None, :], tl.sum(b1, axis=1)[None, :], pre1, out_ptr, r1, ok, offs_n,
               n_ok, stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot, dtype, HAS_RESIDUAL, SILU_MUL, ROPE,
               NUM_Q_HEADS, NUM_KV_HEADS, HALF)
    if ROWS > 2:
        _store(tl.sum(a2, axis=1)[None, :], tl.sum(b2, axis=1)[None, :], pre2, out_ptr, r2, ok, offs_n,
               n_ok, stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot, dtype, HAS_RESIDUAL, SILU_MUL, ROPE,
               NUM_Q_HEADS, NUM_KV_HEADS, HALF)
    if ROWS > 3:
        _store(tl.sum(a3, axis=1)[None, :], tl.sum(b3, axis=1)[None, :], pre3, out_ptr, r3, ok, offs_n,
               n_ok, stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot, dtype, HAS_RESIDUAL, SILU_MUL, ROPE,
               NUM_Q_HEADS, NUM_KV_HEADS, HALF)


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, norm_ptr, out_ptr, M, N, K, up_offset, stride_xm, stride_wn, stride_om, eps,
                     cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cs, stride_c_slot,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     EVEN_K: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     SILU_MUL: tl.constexpr, ROPE: tl.constexpr, PAIRED: tl.constexpr, NUM_Q_HEADS: tl.constexpr,
                     NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr):
    """5 to 16 rows, padded to 16 for the tensor cores: FMAs would cost more than the weight's bytes."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_rows = _weight_rows(w_ptr, offs_n, stride_wn, ROPE, HALF)
    rows = tl.arange(0, 16)
    m_ok = rows < M
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    rope = _rope_inputs(rows, m_ok, offs_n, n_ok, cos_ptr, sin_ptr, pos_ptr, slot_ptr, stride_cs, dtype, ROPE, HALF)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    pre = (_residual(out_ptr, rows, m_ok, offs_n, n_ok, stride_om, HAS_RESIDUAL),) + rope
    inv = 0.0
    if HAS_NORM:
        inv = _row_scale(x_ptr, rows, m_ok, stride_xm, K, eps, BLOCK_K)
    acc_a = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc_b = acc_a

    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w_mask = n_ok[:, None] if EVEN_K else n_ok[:, None] & (ks < K)[None, :]
        x = _x_tile(x_ptr, rows, m_ok, stride_xm, ks, K, norm_ptr, inv, EVEN_K, HAS_NORM)
        wa = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        acc_a = tl.dot(x, tl.trans(wa), acc_a, input_precision=DOT_PRECISION)
        if PAIRED:
            wb = tl.load(w_rows + up_offset * stride_wn + ks[None, :], mask=w_mask, other=0.0,
                         eviction_policy="evict_first")
            acc_b = tl.dot(x, tl.trans(wb), acc_b, input_precision=DOT_PRECISION)

    _store(acc_a, acc_b, pre, out_ptr, rows, m_ok, offs_n, n_ok, stride_om, k_cache_ptr, v_cache_ptr, stride_c_slot,
           dtype, HAS_RESIDUAL, SILU_MUL, ROPE, NUM_Q_HEADS, NUM_KV_HEADS, HALF)


def default_config(m: int, n_out: int, k: int, paired: bool, *, norm: bool = False, elem_bytes: int = 2,
                   smem_bytes: int = 99 * 1024) -> GemvConfig:
    """Launch shape for `m` rows, `n_out` output columns and reduction length `k`.

    From `tools/bench_gemv.py --sweep` on an H100 (bf16, each projection with its fused prologue and
    epilogue): one or two rows want 1024-element K steps and few columns per program (thousands of
    programs, each with its loads in flight at once); software pipelining made no difference there.
    From three rows on, or two through gate_up, tl.dot wins, its pipeline depth bounded by
    `smem_bytes` (what a block may use on this GPU).
    """
    if m == 1 or (m == 2 and not paired):
        # A long K (down_proj) in 2048-wide steps: half the loop trips (docs/benchmarks.md, the GEMV sweep).
        block_k = min(2048 if m == 1 and k >= 8192 else 1024, triton.next_power_of_2(k))
        if m == 1 and not paired and n_out <= k <= 2048:
            # A small square projection (the 1B's o_proj): its whole K row in one step, so every byte of
            # its weight is requested before the dependent-launch wait, while attention runs (wider steps
            # for the larger projections measured slower: docs/benchmarks.md).
            block_k = triton.next_power_of_2(k)
        while block_k > 512 and k % block_k:   # a K step that divides K spares the masked tail
            block_k //= 2
        block_n = 4 if m == 1 and not paired else 2   # gate_up and q/k/v with RoPE read two tiles a step
        block_n = max(block_n, min(16, 8 * 32 * 4 // block_k))   # >= one 16-byte load per thread
        return GemvConfig(block_n, block_k, 4, 1)
    # Small N: 16 columns and deep K steps keep ~128 programs busy; otherwise 32 columns.
    block_n, block_k, stages = (16, 512, 4) if n_out <= 2048 else (32, 128, 6)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    # Triton keeps stages - 1 copies of the x, weight and norm-weight tiles, plus (with a norm) the
    # normed x tile on its way to the tensor cores.
    per_stage = (16 + (2 if paired else 1) * block_n + (1 if norm else 0)) * block_k * elem_bytes
    fixed = (16 * block_k * elem_bytes if norm else 0) + 4 * 1024
    stages = max(1, min(stages, 1 + (smem_bytes - fixed) // per_stage))
    return GemvConfig(block_n, block_k, 4, stages, dot=True)


def shared_memory_bytes(device: torch.device) -> int:
    """Shared memory one block may use on `device` (bounds the dot kernel's pipeline depth)."""
    if device.type != "cuda":   # the Triton interpreter
        return 1 << 20
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 99 * 1024)


def linear(x: torch.Tensor, weight: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
           residual: torch.Tensor | None = None, silu_mul: bool = False, rope: RopeKV | None = None,
           out_dtype: torch.dtype | None = None, config: GemvConfig | None = None,
           dependent_launch: bool = False) -> torch.Tensor:
    """epilogue(prologue(x) @ weight.T) for x [M <= MAX_ROWS, K] and an nn.Linear weight [N, K].

    norm_weight: RMSNorm x's rows first (weight [K], `eps`). residual [M, N]: add the product into
    it in place and return it. silu_mul: weight is gate_up [2I, K]; return silu(gate) * up [M, I].
    rope: weight is the fused q/k/v projection; rotate q and k, write k and v into their cache slots
    and return q [M, num_q_heads * head_dim].
    out_dtype=torch.float32: write the (model-dtype-rounded) product as float32, as the logits are.
    dependent_launch: launch with programmatic dependent launch (compute capability 9.0+): the kernel
    lets the next kernel launch as soon as it starts, streams its first weight tile, and waits for the
    kernel before it (complete, its writes visible) only before it reads x. Before that wait a kernel
    reads nothing a kernel of the step writes (weights, the KV cache's older entries, and the step's
    inputs: RoPE's positions and slots must come from a copy, not a kernel of the step), and a kernel
    completes only after its own wait returned, so a kernel also sees the writes of those before the
    kernel it waits on: several kernels ahead may be resident, streaming weights, at once.
    No bias: a biased linear stays on F.linear. Launches only (no host sync), so it can be captured in
    a CUDA graph once each shape has run (compiled) outside the capture.
    """
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has {k} columns, weight {tuple(weight.shape)}")
    if m > MAX_ROWS:
        raise ValueError(f"{m} rows: use F.linear beyond MAX_ROWS={MAX_ROWS}")
    if silu_mul and (residual is not None or n % 2):
        raise ValueError("silu_mul needs an even gate_up weight and no residual")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        raise ValueError("weight must be contiguous along K")
    n_out = n // 2 if silu_mul else n
    rope_args: tuple = (x, x, x, x, x, x, 0, 0)
    if rope is not None:
        if silu_mul or residual is not None or out_dtype not in (None, x.dtype) or rope.head_dim % 2:
            raise ValueError("rope is an epilogue of its own: no silu_mul, residual or out_dtype")
        if n != (rope.num_q_heads + 2 * rope.num_kv_heads) * rope.head_dim:
            raise ValueError(f"weight has {n} rows, not (q heads + 2 kv heads) * head_dim")
        cache_shape = (rope.num_kv_heads, rope.head_dim)
        for cache in (rope.k_cache, rope.v_cache):
            if tuple(cache.shape[1:]) != cache_shape or not cache.is_contiguous() or cache.dtype != x.dtype:
                raise ValueError(f"caches must be contiguous [slots, {cache_shape[0]}, {cache_shape[1]}] {x.dtype}")
        if rope.positions.shape != (m,) or rope.slots.shape != (m,):
            raise ValueError(f"positions and slots must have {m} entries")
        n_out = n // 2   # programs count (d, d + head_dim/2) column pairs
        rope_args = (rope.cos, rope.sin, rope.positions, rope.slots, rope.k_cache, rope.v_cache,
                     rope.cos.stride(0), rope.k_cache.stride(0))
    if residual is not None:
        if residual.shape != (m, n) or residual.stride(1) != 1 or residual.dtype != x.dtype:
            raise ValueError(f"residual must be a row-major [{m}, {n}] {x.dtype} tensor")
        if out_dtype not in (None, residual.dtype):
            raise ValueError("the residual epilogue writes the residual's dtype")
        if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("x must not share memory with the residual it is added into")   # a race
        out = residual
    elif rope is not None:
        out = torch.empty(m, rope.num_q_heads * rope.head_dim, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(m, n_out, dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out
    paired = silu_mul or rope is not None
    cfg = config or default_config(m, n_out, k, paired, norm=norm_weight is not None,
                                   elem_bytes=x.element_size(), smem_bytes=shared_memory_bytes(x.device))
    args = (x, weight, norm_weight if norm_weight is not None else x, out)
    flags = dict(BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
                 HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
                 ROPE=rope is not None, PAIRED=paired,
                 NUM_Q_HEADS=rope.num_q_heads if rope else 1, NUM_KV_HEADS=rope.num_kv_heads if rope else 1,
                 HALF=rope.head_dim // 2 if rope else 1, USE_PDL=dependent_launch,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if dependent_launch:
        flags["launch_pdl"] = True
    up_offset = rope.head_dim // 2 if rope else n_out   # rows between a column's pair of weight rows
    grid = (triton.cdiv(n_out, cfg.block_n),)
    if cfg.dot:
        _gemv_dot_kernel[grid](*args, m, n_out, k, up_offset, x.stride(0), weight.stride(0), out.stride(0), eps,
                               *rope_args, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **flags)
    else:
        if m > 4:
            raise ValueError("the FMA kernel takes at most 4 rows")
        _gemv_rows_kernel[grid](*args, n_out, k, up_offset, x.stride(0), weight.stride(0), out.stride(0), eps,
                                *rope_args, ROWS=m, **flags)
    return out

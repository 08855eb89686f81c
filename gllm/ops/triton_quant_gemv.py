"""Decode-sized matmuls over weights kept in 4 or 8 bits (`gllm.ops.quant_layout.QuantWeight`), dequantized in
registers, and the dequantization of a whole weight for wider products (issue 22's GPU path).

At batch 1 a linear layer's time is its weight's bytes over memory bandwidth, so reading 4.5 bits a weight
instead of 16 is the whole point. Each program owns whole output rows over all of K (no split-K: one fixed
summation order, no atomics); products accumulate in float32 and are rounded to x's dtype, as a linear's are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gllm.ops.quant_layout import INTERLEAVE, QuantWeight

MAX_ROWS = 8        # more rows: dequantize once (`dequantize_dense`) and use a dense matmul


@triton.jit
def _code_as_float(words, i: tl.constexpr, BITS: tl.constexpr):
    """Code i of each word as 1 + u / 2^BITS (u: the code as offset binary), exact, without a conversion
    instruction: the code is moved to the top of the mantissa and OR-ed into 1.0's bits."""
    TOP: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    if TOP >= BITS * i:
        moved = words << (TOP - BITS * i)
    else:
        moved = words >> (BITS * i - TOP)
    if BITS == 8:
        moved = moved ^ (0x80 << TOP)          # int8: two's complement to offset binary
    return ((moved & (MASK << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _quant_gemv_row_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                           GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    # One row of x; tiles [row quads, groups, words of a group, 4 rows]. x comes permuted and in float32
    # (xp[i, j] = x[PER_WORD * j + i]), so its values for code i of a tile's words are one contiguous load.
    # Per group: sum(u x) = 2^BITS (sum(f x) - sum(x)) for f = 1 + u / 2^BITS; the scale (and offset times
    # sum(x)) is applied once per group, and the sum along K is reduced once, at the end.
    PER_WORD: tl.constexpr = 32 // BITS
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 0.0 if BITS == 4 else 128.0     # int8: code = u - 128
    quads = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q_ok = quads < (N + R - 1) // R
    row_words = K // PER_WORD
    groups = K // GROUP
    lanes = tl.arange(0, R)
    acc = tl.zeros([BLOCK_R, GROUPS, R], dtype=tl.float32)
    for g0 in range(0, groups, GROUPS):
        gs = g0 + tl.arange(0, GROUPS)
        g_ok = gs < groups
        js = gs[:, None] * GROUP_WORDS + tl.arange(0, GROUP_WORDS)[None, :]             # [GROUPS, GROUP_WORDS]
        words = tl.load(w_ptr + (quads[:, None, None, None] * row_words + js[None, :, :, None]) * R
                        + lanes[None, None, None, :],
                        mask=q_ok[:, None, None, None] & g_ok[None, :, None, None], other=0)
        part = tl.zeros([BLOCK_R, GROUPS, GROUP_WORDS, R], dtype=tl.float32)
        x_sum = tl.zeros([GROUPS, GROUP_WORDS], dtype=tl.float32)
        for i in tl.static_range(PER_WORD):
            xi = tl.load(xp_ptr + i * row_words + js, mask=g_ok[:, None], other=0.0)
            part += _code_as_float(words, i, BITS) * xi[None, :, :, None]
            x_sum += xi
        fx = tl.sum(part, axis=2)                                                        # [BLOCK_R, GROUPS, R]
        xs = tl.sum(x_sum, axis=1)[None, :, None]
        at = (quads[:, None, None] * groups + gs[None, :, None]) * R + lanes[None, None, :]
        ok = q_ok[:, None, None] & g_ok[None, :, None]
        scale = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
        acc += scale * (SPAN * (fx - xs) - BIAS * xs)
        if HAS_ZERO:
            acc += tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32) * xs
    ns = quads[:, None] * R + lanes[None, :]
    tl.store(out_ptr + ns, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=ns < N)


@triton.jit
def _quant_gemv_rows_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_om,
                            GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    # Several rows of x (padded to ROWS >= 16 for the tensor cores): each tile of codes is dequantized once, in
    # registers, to x's dtype and multiplied into every row with tl.dot. x comes permuted, xp[m, i, j] =
    # x[m, PER_WORD * j + i], so code i of a tile's words meets a [ROWS, words] slice of x: one dot per code
    # position. Weights are w = (f - 1) * 2^BITS * scale + zero for f = 1 + u / 2^BITS (u - 128 for int8),
    # i.e. f * a + b with a = 2^BITS * scale and b = zero - a (- 128 scale), per group.
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 0.0 if BITS == 4 else 128.0
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    rows = tl.arange(0, ROWS)
    m_ok = rows < M
    row_words = K // PER_WORD
    groups = K // GROUP
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, row_words, WORDS):
        js = j0 + tl.arange(0, WORDS)
        j_ok = js < row_words
        w_ok = j_ok[:, None] & n_ok[None, :]
        words = tl.load(w_ptr + ((ns[None, :] // R) * row_words + js[:, None]) * R + ns[None, :] % R,
                        mask=w_ok, other=0)                                          # [WORDS, BLOCK_N]
        at = ((ns[None, :] // R) * groups + js[:, None] // GROUP_WORDS) * R + ns[None, :] % R
        scale = tl.load(s_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
        a = SPAN * scale
        b = -a - BIAS * scale
        if HAS_ZERO:
            b += tl.load(z_ptr + at, mask=w_ok, other=0.0).to(tl.float32)
        for i in tl.static_range(PER_WORD):
            w = (_code_as_float(words, i, BITS) * a + b).to(xp_ptr.dtype.element_ty)
            xi = tl.load(xp_ptr + (rows[:, None] * PER_WORD + i) * row_words + js[None, :],
                         mask=m_ok[:, None] & j_ok[None, :], other=0.0)             # [ROWS, WORDS]
            acc += tl.dot(xi, w, input_precision="ieee")
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


class QuantGemvConfig(NamedTuple):
    block: int        # one row: row quads per program; several rows: output rows per program
    block_k: int
    num_warps: int = 2
    num_stages: int = 3


ROW_CONFIG = QuantGemvConfig(block=1, block_k=2048, num_warps=2, num_stages=3)
ROWS_CONFIG = QuantGemvConfig(block=64, block_k=256, num_warps=4, num_stages=3)


def quant_gemv(x: torch.Tensor, w: QuantWeight, config: QuantGemvConfig | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times the dequantized weight, transposed: [M, N] in x's dtype (into `out`, an
    [M, N] view whose rows are contiguous, e.g. a column slice of a wider output, when given)."""
    m, k = x.shape
    if k != w.in_features or m > MAX_ROWS:
        raise ValueError(f"quant_gemv takes [<= {MAX_ROWS}, {w.in_features}] inputs, got {list(x.shape)}")
    n, per_word = w.out_features, 32 // w.bits
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} view with contiguous rows")
    zero = w.zero if w.zero is not None else w.scale
    if m == 1:
        config = config or ROW_CONFIG
        xp = x.float().reshape(k // per_word, per_word).t().contiguous()   # xp[i, j] = x[per_word * j + i]
        block_k = min(config.block_k, max(w.group, triton.next_power_of_2(k)))
        grid = (triton.cdiv(triton.cdiv(n, INTERLEAVE), config.block),)
        _quant_gemv_row_kernel[grid](xp, w.words, w.scale, zero, out, n, k, GROUP=w.group, BITS=w.bits,
                                     HAS_ZERO=w.zero is not None, BLOCK_R=config.block, BLOCK_K=block_k,
                                     R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    config = config or ROWS_CONFIG
    xp = x.reshape(m, k // per_word, per_word).transpose(1, 2).contiguous()   # xp[m, i, j] = x[m, per_word * j + i]
    block_k = min(config.block_k, max(per_word * 16, triton.next_power_of_2(k)))
    _quant_gemv_rows_kernel[(triton.cdiv(n, config.block),)](
        xp, w.words, w.scale, zero, out, m, n, k, out.stride(0), GROUP=w.group, BITS=w.bits,
        HAS_ZERO=w.zero is not None, ROWS=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block,
        BLOCK_K=block_k, R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_W: tl.constexpr, R: tl.constexpr):
    # Tiles [row quads, words, 4 rows]; code i of word j is element PER_WORD * j + i of its row. w = f * a + b
    # with f = 1 + u / 2^BITS, a = 2^BITS * scale, b = zero - a (- 128 scale for int8), as in the rows kernel.
    PER_WORD: tl.constexpr = 32 // BITS
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 0.0 if BITS == 4 else 128.0
    quads = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    js = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    lanes = tl.arange(0, R)
    row_words = K // PER_WORD
    groups = K // GROUP
    ns = quads[:, None, None] * R + lanes[None, None, :]                                  # [BLOCK_Q, 1, R]
    ok = (ns < N) & (js[None, :, None] < row_words)
    words = tl.load(w_ptr + (quads[:, None, None] * row_words + js[None, :, None]) * R + lanes[None, None, :],
                    mask=ok, other=0)
    at = (quads[:, None, None] * groups + js[None, :, None] // GROUP_WORDS) * R + lanes[None, None, :]
    scale = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
    a = SPAN * scale
    b = -a - BIAS * scale
    if HAS_ZERO:
        b += tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
    base = out_ptr + ns * K + PER_WORD * js[None, :, None]
    for i in tl.static_range(PER_WORD):
        tl.store(base + i, (_code_as_float(words, i, BITS) * a + b).to(out_ptr.dtype.element_ty), mask=ok)


def dequantize_dense(w: QuantWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight [N, K] in `dtype` on its device (into `out`, [N, K] with contiguous rows, when given):
    for products of more rows than `quant_gemv` takes, which then run as a dense matmul."""
    n, k = w.out_features, w.in_features
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=w.words.device)
    elif out.shape != (n, k) or out.stride(1) != 1 or out.stride(0) != k:
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor")
    block_q, block_w = 8, 64
    grid = (triton.cdiv(triton.cdiv(n, INTERLEAVE), block_q), triton.cdiv(k * w.bits // 32, block_w))
    _dequantize_kernel[grid](w.words, w.scale, w.zero if w.zero is not None else w.scale, out, n, k,
                             GROUP=w.group, BITS=w.bits, HAS_ZERO=w.zero is not None, BLOCK_Q=block_q,
                             BLOCK_W=block_w, R=INTERLEAVE, num_warps=4)
    return out

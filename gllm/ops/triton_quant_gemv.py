"""Decode-sized matmuls over weights kept in 4 or 8 bits (`gllm.ops.quant_layout.QuantWeight`), dequantized in
registers, and the dequantization of a whole weight for wider products (issue 22's GPU path).

At batch 1 a linear layer's time is its weight's bytes over memory bandwidth, so reading 4.5 bits a weight
instead of 16 is the whole point. Each program owns whole output rows over all of K (no split-K: one fixed
summation order, no atomics); products accumulate in float32 and are rounded to x's dtype, as a linear's are.

A 16-bit row (bfloat16 / float16 models) goes through the weights on integer dot products: x is rounded to
int8 per block of 32 (scale max|x| / 127, llama.cpp's Q8_1 idea) and each weight word meets it in `dp4a`
instructions, four products and their sum in one, summed exactly in int32 within a block. Unpacking codes to
floats took three instructions a weight and held the kernel near half the memory bandwidth; this takes about
five for eight weights. x's rounding (at most max|x| / 254 an element) is of the order of its bfloat16
rounding; float32 rows keep the exact float kernel.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gllm.ops.quant_layout import INTERLEAVE, QuantWeight

SCALES = {"affine": 0, "q4_k": 1, "q6_k": 2}   # a weight's kind as the kernels' constant
# More rows: dequantize once (`dequantize_dense`) and use a dense matmul. At 16 rows the several-rows kernel
# still beats that 1.3-2.5x on the 8B projections; at 64 it loses 1.3-2x (H200, docs/benchmarks.md, s22).
MAX_ROWS = 16
ROW_INPUTS_BLOCK = 512   # elements of a row a `row_inputs` program prepares (a 14,336 row: 28 programs)


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
def _word_tile(w_ptr, quads, q_ok, js, js_ok, row_words, R: tl.constexpr):
    """The code words [quads, *js.shape, R] of row quads `quads` at word positions `js` ([spans, words]; the
    spans valid where `js_ok`): each quad's four rows sit side by side, so a quad's words load as one vector."""
    return tl.load(w_ptr + (quads[:, None, None, None] * row_words + js[None, :, :, None]) * R
                   + tl.arange(0, R)[None, None, None, :],
                   mask=q_ok[:, None, None, None] & js_ok[None, :, None, None], other=0)


@triton.jit
def _group_scales(s_ptr, z_ptr, quad, g, lane, ok, groups, SCALES: tl.constexpr, HAS_ZERO: tl.constexpr,
                  R: tl.constexpr):
    """Float32 (scale, offset) of group `g` of row `lane` of quad `quad` (index tensors that broadcast), by the
    weight's kind (SCALES: 0 affine, 1 q4_k, 2 q6_k; see `gllm.ops.quant_layout`); the offset is the scale
    again where the weight has none. q4_k: s_ptr the packed scales, z_ptr d and dmin; q6_k: s_ptr the int8
    sub-scales, z_ptr the float16 d per 256."""
    if SCALES == 1:
        block = quad * (groups // 8) + g // 8                      # the (row quad, super-block)
        d = tl.load(z_ptr + block * 2 * R + lane, mask=ok, other=0.0).to(tl.float32)
        dmin = tl.load(z_ptr + (block * 2 + 1) * R + lane, mask=ok, other=0.0).to(tl.float32)
        j = g % 8
        a = tl.load(s_ptr + (block * 12 + j) * R + lane, mask=ok, other=0).to(tl.int32)        # sc | m << 6
        c = tl.load(s_ptr + (block * 12 + 8 + j // 2) * R + lane, mask=ok, other=0).to(tl.int32)   # m >> 2
        sc = a & 63
        mn = (a >> 6) | (((c >> ((j % 2) * 4)) & 15) << 2)
        scale = d * sc.to(tl.float32)
        zero = -dmin * mn.to(tl.float32)
    elif SCALES == 2:
        d = tl.load(z_ptr + (quad * (groups // 16) + g // 16) * R + lane, mask=ok, other=0.0).to(tl.float32)
        scale = d * tl.load(s_ptr + (quad * groups + g) * R + lane, mask=ok, other=0).to(tl.float32)
        zero = -32.0 * scale
    else:
        at = (quad * groups + g) * R + lane
        scale = tl.load(s_ptr + at, mask=ok, other=0.0).to(tl.float32)
        zero = scale
        if HAS_ZERO:
            zero = tl.load(z_ptr + at, mask=ok, other=0.0).to(tl.float32)
    return scale, zero


@triton.jit
def _top_bits(high, i, t):
    """Six-bit codes: the top two bits of code i of the low words of parity `t` (which of a pair), from their
    pair's word of top bits (layout: `gllm.ops.quant_layout`)."""
    return (high >> (8 * (i // 2) + 2 * (i % 2) + 4 * t)) & 3


@triton.jit
def _code_at(w_ptr, h_ptr, quad, lane, ks, ok, K, BITS: tl.constexpr, R: tl.constexpr):
    """The integer code of element `ks` of row `lane` of quad `quad` (offset binary for 4 and 6 bits, signed
    for 8): for lanes that each produce one weight (dequantization, embedding lookups)."""
    PER_WORD: tl.constexpr = 8 if BITS == 6 else 32 // BITS
    WIDTH: tl.constexpr = 4 if BITS == 6 else BITS
    MASK: tl.constexpr = (1 << WIDTH) - 1
    words = tl.load(w_ptr + (quad * (K // PER_WORD) + ks // PER_WORD) * R + lane, mask=ok, other=0)
    code = (words >> ((ks % PER_WORD) * WIDTH)) & MASK
    if BITS == 8:
        code = (code ^ 0x80) - 0x80                        # int8: two's complement
    if BITS == 6:
        high = tl.load(h_ptr + (quad * (K // 16) + ks // 16) * R + lane, mask=ok, other=0)
        code |= _top_bits(high, ks % 8, (ks // 8) % 2) << 4
    return code


@triton.jit
def _code6_as_float(words, high, i: tl.constexpr, t):
    """Six-bit code i of each low word (of parity t) as 1 + u / 64, as `_code_as_float` does four and eight."""
    code = ((words >> (4 * i)) & 0xF) | (_top_bits(high, i, t) << 4)
    return ((code << 17) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _quant_gemv_row_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, h_ptr, out_ptr, N, K,
                           GROUP: tl.constexpr, BITS: tl.constexpr, SCALES: tl.constexpr, HAS_ZERO: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    # One row of x; tiles [row quads, groups, words of a group, 4 rows]. x comes permuted and in float32
    # (xp[i, j] = x[PER_WORD * j + i]), so its values for code i of a tile's words are one contiguous load.
    # Per group: sum(u x) = 2^BITS (sum(f x) - sum(x)) for f = 1 + u / 2^BITS; the scale (and offset times
    # sum(x)) is applied once per group, and the sum along K is reduced once, at the end.
    PER_WORD: tl.constexpr = 8 if BITS == 6 else 32 // BITS
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 128.0 if BITS == 8 else 0.0     # int8: code = u - 128
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
        words = _word_tile(w_ptr, quads, q_ok, js, g_ok, row_words, R)
        high = words
        if BITS == 6:   # groups of 16: one word of top bits a group, for its pair of low words
            high = _word_tile(h_ptr, quads, q_ok, gs[:, None], g_ok, K // 16, R)
        part = tl.zeros([BLOCK_R, GROUPS, GROUP_WORDS, R], dtype=tl.float32)
        x_sum = tl.zeros([GROUPS, GROUP_WORDS], dtype=tl.float32)
        for i in tl.static_range(PER_WORD):
            xi = tl.load(xp_ptr + i * row_words + js, mask=g_ok[:, None], other=0.0)
            if BITS == 6:
                f = _code6_as_float(words, high, i, tl.arange(0, GROUP_WORDS)[None, None, :, None])
            else:
                f = _code_as_float(words, i, BITS)
            part += f * xi[None, :, :, None]
            x_sum += xi
        fx = tl.sum(part, axis=2)                                                        # [BLOCK_R, GROUPS, R]
        xs = tl.sum(x_sum, axis=1)[None, :, None]
        ok = q_ok[:, None, None] & g_ok[None, :, None]
        scale, zero = _group_scales(s_ptr, z_ptr, quads[:, None, None], gs[None, :, None], lanes[None, None, :],
                                    ok, groups, SCALES, HAS_ZERO, R)
        acc += scale * (SPAN * (fx - xs) - BIAS * xs)
        if HAS_ZERO:
            acc += zero * xs
    ns = quads[:, None] * R + lanes[None, :]
    y = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:   # out is the residual stream, updated in place: the product rounded, then the sum
        y = (tl.load(out_ptr + ns, mask=ns < N, other=0.0).to(tl.float32) + y.to(tl.float32)).to(y.dtype)
    tl.store(out_ptr + ns, y, mask=ns < N)


@triton.jit
def _dot4(a, b, c, SIGNED_A: tl.constexpr, EMULATE: tl.constexpr):
    """c + the dot product of a's four bytes (unsigned, or signed with SIGNED_A) with b's (signed): `dp4a`.
    EMULATE: the same with shifts, for the Triton interpreter, which runs no inline assembly."""
    if EMULATE:
        for i in tl.static_range(4):
            if SIGNED_A:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 0xFF
            c += ai * ((b << (24 - 8 * i)) >> 24)
        return c
    elif SIGNED_A:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _weight_blocks(w_ptr, s_ptr, z_ptr, h_ptr, quads, q_ok, b0, blocks, row_words, groups, K,
                   QBW: tl.constexpr, NB: tl.constexpr, BPG: tl.constexpr, BITS: tl.constexpr,
                   SCALES: tl.constexpr, HAS_ZERO: tl.constexpr, R: tl.constexpr):
    """The weight's share of blocks b0 .. b0 + NB of x for row quads `quads`: code words [quads, NB, QBW, R],
    six-bit codes' top bits [quads, NB, 1, R] (blocks of 16: one word a block; the code words again for other
    widths), scales and offsets [quads, NB, R] in float32 (offsets: the scales again without any)."""
    bs = b0 + tl.arange(0, NB)
    b_ok = bs < blocks
    words = _word_tile(w_ptr, quads, q_ok, bs[:, None] * QBW + tl.arange(0, QBW)[None, :], b_ok, row_words, R)
    high = words
    if BITS == 6:
        high = _word_tile(h_ptr, quads, q_ok, bs[:, None], b_ok, K // 16, R)
    ok = q_ok[:, None, None] & b_ok[None, :, None]
    scale, zero = _group_scales(s_ptr, z_ptr, quads[:, None, None], (bs // BPG)[None, :, None],
                                tl.arange(0, R)[None, None, :], ok, groups, SCALES, HAS_ZERO, R)
    return words, high, scale, zero


@triton.jit
def _quant_gemv_row_q8_kernel(xq_ptr, xs_ptr, xsum_ptr, w_ptr, s_ptr, z_ptr, h_ptr, out_ptr, N, K,
                              GROUP: tl.constexpr, BITS: tl.constexpr, SCALES: tl.constexpr,
                              HAS_ZERO: tl.constexpr,
                              HAS_RESIDUAL: tl.constexpr, QB: tl.constexpr, EMULATE: tl.constexpr,
                              BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr,
                              USE_PDL: tl.constexpr):
    # One row of x as int8 per block of QB (`row_inputs`: xq holds its bytes packed as the weight words hold
    # codes, xs each block's scale, xsum each block's sum of rounded x), tiles [row quads, x blocks, words of
    # a block, 4 rows]. Per block: sum(w q xs) = scale (xs sum(u q)) + zero xsum, sum(u q) exact in int32;
    # int8 codes are two's complement (w = c scale), four- and six-bit ones offset binary (w = u scale + zero;
    # a six-bit code's top bits are put beside its low nibble, byte for byte, before the dot product). The
    # weight is loaded one tile ahead, the first tile before the dependent-launch wait (see
    # `triton_gemv.linear`): HBM streams this kernel's weight while the kernel before it ends.
    PER_WORD: tl.constexpr = 8 if BITS == 6 else 32 // BITS
    QBW: tl.constexpr = QB // PER_WORD           # words per block of x
    NB: tl.constexpr = BLOCK_K // QB
    BPG: tl.constexpr = GROUP // QB
    tl.static_assert(BITS != 6 or QB == 16, "six-bit codes take x in blocks of 16 (their groups)")
    if USE_PDL:   # the next kernel may launch now: before its own wait it reads nothing this one writes
        tl.extra.cuda.gdc_launch_dependents()
    quads = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q_ok = quads < (N + R - 1) // R
    row_words = K // PER_WORD
    blocks = K // QB
    groups = K // GROUP
    words_next, high_next, scale_next, zero_next = _weight_blocks(
        w_ptr, s_ptr, z_ptr, h_ptr, quads, q_ok, 0, blocks, row_words, groups, K, QBW, NB, BPG, BITS, SCALES,
        HAS_ZERO, R)
    if USE_PDL:   # x and the residual come from the kernels before
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros([BLOCK_R, NB, R], dtype=tl.float32)
    for b0 in range(0, blocks, NB):
        words, high, scale, zero = words_next, high_next, scale_next, zero_next
        words_next, high_next, scale_next, zero_next = _weight_blocks(
            w_ptr, s_ptr, z_ptr, h_ptr, quads, q_ok, b0 + NB, blocks, row_words, groups, K, QBW, NB, BPG, BITS,
            SCALES, HAS_ZERO, R)
        bs = b0 + tl.arange(0, NB)
        b_ok = bs < blocks
        js = bs[:, None] * QBW + tl.arange(0, QBW)[None, :]                                  # [NB, QBW]
        sums = tl.zeros([BLOCK_R, NB, QBW, R], dtype=tl.int32)
        if BITS == 8:
            xw = tl.load(xq_ptr + js, mask=b_ok[:, None], other=0)
            sums = _dot4(words, tl.broadcast_to(xw[None, :, :, None], sums.shape), sums, True, EMULATE)
        else:   # the low nibbles are codes 0, 2, 4, 6 of the word, the high ones 1, 3, 5, 7
            x_even = tl.load(xq_ptr + js, mask=b_ok[:, None], other=0)
            x_odd = tl.load(xq_ptr + row_words + js, mask=b_ok[:, None], other=0)
            even = words & 0x0F0F0F0F
            odd = (words >> 4) & 0x0F0F0F0F
            if BITS == 6:   # the pair's top bits, shifted to this word's: bits 4-5 of each byte
                top = high >> (4 * tl.arange(0, QBW))[None, None, :, None]
                even = even | ((top << 4) & 0x30303030)
                odd = odd | ((top << 2) & 0x30303030)
            sums = _dot4(even, tl.broadcast_to(x_even[None, :, :, None], sums.shape), sums, False, EMULATE)
            sums = _dot4(odd, tl.broadcast_to(x_odd[None, :, :, None], sums.shape), sums, False, EMULATE)
        block_sum = tl.sum(sums, axis=2).to(tl.float32)                                     # [BLOCK_R, NB, R]
        acc += scale * (block_sum * tl.load(xs_ptr + bs, mask=b_ok, other=0.0)[None, :, None])
        if HAS_ZERO:
            acc += zero * tl.load(xsum_ptr + bs, mask=b_ok, other=0.0)[None, :, None]
    lanes = tl.arange(0, R)
    ns = quads[:, None] * R + lanes[None, :]
    y = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
    if HAS_RESIDUAL:   # as the float kernel: the product rounded, then the sum
        y = (tl.load(out_ptr + ns, mask=ns < N, other=0.0).to(tl.float32) + y.to(tl.float32)).to(y.dtype)
    tl.store(out_ptr + ns, y, mask=ns < N)


@triton.jit
def _row_inputs_kernel(x_ptr, norm_ptr, xp_ptr, xs_ptr, xsum_ptr, K, eps, PER_WORD: tl.constexpr,
                       HAS_NORM: tl.constexpr, SILU_MUL: tl.constexpr, QB: tl.constexpr, BLOCK: tl.constexpr,
                       NORM_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    # One row's input to the row kernel, BLOCK elements a program: x (RMS-normed with `norm_ptr` if HAS_NORM; or
    # SiLU(gate) * up of a [gate | up] row of 2K if SILU_MUL), rounded as the unfused kernels round it, then
    # (QB == 0) widened to float32 and stored permuted: xp[i, j] = x[PER_WORD * j + i]; or (QB > 0) rounded to
    # int8 per block of QB (xs: the blocks' scales, xsum: their sums of rounded x) and its bytes packed as the
    # weight words hold codes: 4-bit codes, xp[0, j] = x[8j + 0, 2, 4, 6] and xp[1, j] = x[8j + 1, 3, 5, 7];
    # 8-bit, xp[0, j] = x[4j .. 4j + 3]. With HAS_NORM every program sums the squares of the whole row itself
    # (K reads from L2 cost less than a second launch or a grid-wide reduction).
    dtype = x_ptr.dtype.element_ty
    if USE_PDL:   # the next kernel may launch now: before its own wait it reads nothing this one writes
        tl.extra.cuda.gdc_launch_dependents()
    k0 = tl.program_id(0) * BLOCK
    ks = k0 + tl.arange(0, BLOCK)
    ok = ks < K
    nw = tl.zeros([BLOCK], dtype=dtype)
    if HAS_NORM:
        nw = tl.load(norm_ptr + ks, mask=ok, other=0.0)
    if USE_PDL:   # x comes from the kernel before
        tl.extra.cuda.gdc_wait()
    inv = 0.0
    if HAS_NORM:
        sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
        for n0 in range(0, K, NORM_BLOCK):
            ns = n0 + tl.arange(0, NORM_BLOCK)
            xf = tl.load(x_ptr + ns, mask=ns < K, other=0.0).to(tl.float32)
            sq += xf * xf
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    row_words = K // PER_WORD
    x = tl.load(x_ptr + ks, mask=ok, other=0.0)
    if HAS_NORM:   # as _rms_norm_kernel: normalise in fp32, round, scale in fp32, round
        x = (nw.to(tl.float32) * (x.to(tl.float32) * inv).to(dtype).to(tl.float32)).to(dtype)
    if SILU_MUL:   # as _silu_mul_kernel
        g = x.to(tl.float32)
        up = tl.load(x_ptr + K + ks, mask=ok, other=0.0).to(tl.float32)
        x = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * up).to(dtype)
    if QB == 0:
        tl.store(xp_ptr + (ks % PER_WORD) * row_words + ks // PER_WORD, x.to(tl.float32), mask=ok)
    else:
        xb = tl.reshape(x.to(tl.float32), [BLOCK // QB, QB])
        amax = tl.max(tl.abs(xb), axis=1)
        bs = k0 // QB + tl.arange(0, BLOCK // QB)
        v = xb * tl.where(amax > 0, 127.0 / amax, 0.0)[:, None]
        q = (v + tl.where(v >= 0, 0.5, -0.5)).to(tl.int32)                  # round half away from zero
        # The sum of the rounded x, not of x: offsets then meet the same x as the codes, and a weight's
        # error is its own value times x's rounding (uncentred codes times it would be about twice that).
        tl.store(xs_ptr + bs, amax / 127.0, mask=bs < K // QB)
        tl.store(xsum_ptr + bs, tl.sum(q, axis=1).to(tl.float32) * (amax / 127.0), mask=bs < K // QB)
        q = q & 0xFF
        shifts = 8 * tl.arange(0, 4)
        if PER_WORD == 8:
            packed = tl.sum(tl.reshape(q, [BLOCK // 8, 4, 2]) << shifts[None, :, None], axis=1)   # [words, 2]
            js = k0 // 8 + tl.arange(0, BLOCK // 8)
            tl.store(xp_ptr + tl.arange(0, 2)[None, :] * row_words + js[:, None], packed,
                     mask=js[:, None] < row_words)
        else:
            packed = tl.sum(tl.reshape(q, [BLOCK // 4, 4]) << shifts[None, :], axis=1)
            js = k0 // 4 + tl.arange(0, BLOCK // 4)
            tl.store(xp_ptr + js, packed, mask=js < row_words)


@triton.jit
def _quant_gemv_rows_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, h_ptr, out_ptr, M, N, K, stride_om,
                            GROUP: tl.constexpr, BITS: tl.constexpr, SCALES: tl.constexpr, HAS_ZERO: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    # Several rows of x (padded to ROWS >= 16 for the tensor cores): each tile of codes is dequantized once, in
    # registers, to x's dtype and multiplied into every row with tl.dot. x comes permuted, xp[m, i, j] =
    # x[m, PER_WORD * j + i], so code i of a tile's words meets a [ROWS, words] slice of x: one dot per code
    # position. Weights are w = (f - 1) * 2^BITS * scale + zero for f = 1 + u / 2^BITS (u - 128 for int8),
    # i.e. f * a + b with a = 2^BITS * scale and b = zero - a (- 128 scale), per group.
    PER_WORD: tl.constexpr = 8 if BITS == 6 else 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 128.0 if BITS == 8 else 0.0
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
        high = words
        if BITS == 6:
            high = tl.load(h_ptr + ((ns[None, :] // R) * (K // 16) + js[:, None] // 2) * R + ns[None, :] % R,
                           mask=w_ok, other=0)
        # scales once per group of the tile (a power of two no smaller than a group), then over its words
        tl.static_assert(WORDS % GROUP_WORDS == 0, "a tile of K holds whole groups")
        TILE_GROUPS: tl.constexpr = WORDS // GROUP_WORDS
        gs = j0 // GROUP_WORDS + tl.arange(0, TILE_GROUPS)
        g_ok = (gs < groups)[:, None] & n_ok[None, :]
        scale, zero = _group_scales(s_ptr, z_ptr, ns[None, :] // R, gs[:, None], ns[None, :] % R, g_ok, groups,
                                    SCALES, HAS_ZERO, R)
        a = SPAN * scale
        b = -a - BIAS * scale
        if HAS_ZERO:
            b += zero
        a = tl.reshape(tl.broadcast_to(a[:, None, :], [TILE_GROUPS, GROUP_WORDS, BLOCK_N]), [WORDS, BLOCK_N])
        b = tl.reshape(tl.broadcast_to(b[:, None, :], [TILE_GROUPS, GROUP_WORDS, BLOCK_N]), [WORDS, BLOCK_N])
        for i in tl.static_range(PER_WORD):
            if BITS == 6:
                f = _code6_as_float(words, high, i, js[:, None] % 2)
            else:
                f = _code_as_float(words, i, BITS)
            w = (f * a + b).to(xp_ptr.dtype.element_ty)
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
# The integer row kernel (H200 sweep, tools/bench_quant_gemv.py): wide weights (4,096 row quads and more) run
# best as many one-warp programs, narrow ones with four warps a program over long stretches of K.
ROW_Q8_WIDE = QuantGemvConfig(block=1, block_k=512, num_warps=1, num_stages=4)
ROW_Q8_NARROW = QuantGemvConfig(block=1, block_k=4096, num_warps=4, num_stages=2)
# The K-quants (H200 sweep of the 8B shapes, `bench_quant_gemv.py --sweep --sweep-format q4_k|q6_k`): q4_k runs
# best as one-warp programs over 1,024 of K when wide, two-warp ones over 2,048 when narrow; q6_k as the affine
# kinds when wide, with four warps over 2,048 when narrow.
ROW_Q8_CONFIGS = {("affine", True): ROW_Q8_WIDE, ("affine", False): ROW_Q8_NARROW,
                  ("q4_k", True): QuantGemvConfig(1, 1024, 1, 4), ("q4_k", False): QuantGemvConfig(1, 2048, 2, 3),
                  ("q6_k", True): ROW_Q8_WIDE, ("q6_k", False): QuantGemvConfig(1, 2048, 4, 3)}
ROWS_CONFIG = QuantGemvConfig(block=64, block_k=256, num_warps=4, num_stages=3)


def quant_gemv(x: torch.Tensor, w: QuantWeight, config: QuantGemvConfig | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times the dequantized weight, transposed: [M, N] in x's dtype (into `out`, an
    [M, N] view whose rows are contiguous, e.g. a column slice of a wider output, when given)."""
    m, k = x.shape
    if k != w.in_features or m > MAX_ROWS:
        raise ValueError(f"quant_gemv takes [<= {MAX_ROWS}, {w.in_features}] inputs, got {list(x.shape)}")
    n, per_word = w.out_features, 32 // w.packing
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be a [{m}, {n}] {x.dtype} view with contiguous rows")
    if m == 1:
        inputs = row_inputs(x.contiguous(), w.packing, block=row_block(x.dtype, w.group))
        return quant_gemv_row(inputs, w, out=out, config=config)
    config = config or ROWS_CONFIG
    xp = x.reshape(m, k // per_word, per_word).transpose(1, 2).contiguous()   # xp[m, i, j] = x[m, per_word * j + i]
    block_k = min(config.block_k, max(per_word * 16, triton.next_power_of_2(k)))
    _quant_gemv_rows_kernel[(triton.cdiv(n, config.block),)](
        xp, w.words, out_ptr=out, M=m, N=n, K=k, stride_om=out.stride(0), **kernel_operands(w),
        ROWS=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block,
        BLOCK_K=block_k, R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
    return out


@triton.jit
def _dequantize_kernel(w_ptr, s_ptr, z_ptr, h_ptr, out_ptr, N, K,
                       GROUP: tl.constexpr, BITS: tl.constexpr, SCALES: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R: tl.constexpr):
    # One output element per lane, in the output's row-major order (contiguous stores): each reads the word
    # holding its code (eight neighbours read the same word, from cache) and its group's scale.
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (ns[:, None] < N) & (ks[None, :] < K)
    quad, lane = ns[:, None] // R, ns[:, None] % R
    code = _code_at(w_ptr, h_ptr, quad, lane, ks[None, :], ok, K, BITS, R)
    # scales once per group of the tile, then repeated over its elements (a K-quant's take a dozen operations)
    TILE_GROUPS: tl.constexpr = BLOCK_K // GROUP
    gs = tl.program_id(1) * TILE_GROUPS + tl.arange(0, TILE_GROUPS)
    g_ok = (ns[:, None] < N) & (gs[None, :] < K // GROUP)
    scale, zero = _group_scales(s_ptr, z_ptr, quad, gs[None, :], lane, g_ok, K // GROUP, SCALES, HAS_ZERO, R)
    value = code.to(tl.float32) * tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, TILE_GROUPS, GROUP]),
                                             [BLOCK_N, BLOCK_K])
    if HAS_ZERO:
        value += tl.reshape(tl.broadcast_to(zero[:, :, None], [BLOCK_N, TILE_GROUPS, GROUP]), [BLOCK_N, BLOCK_K])
    tl.store(out_ptr + ns[:, None] * K + ks[None, :], value.to(out_ptr.dtype.element_ty), mask=ok)


def kernel_operands(w: QuantWeight) -> dict:
    """What every kernel here takes of a weight besides its code words: the scale and offset pointers
    (`_group_scales`), the six-bit codes' top bits (the words again for other widths), and the constants."""
    if w.kind != "affine":
        zero = w.lead
    else:
        zero = w.zero if w.zero is not None else w.scale
    return {"s_ptr": w.scale, "z_ptr": zero, "h_ptr": w.high if w.high is not None else w.words,
            "GROUP": w.group, "BITS": w.bits, "SCALES": SCALES[w.kind], "HAS_ZERO": w.has_offset}


def dequantize_dense(w: QuantWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole weight [N, K] in `dtype` on its device (into `out`, [N, K] with contiguous rows, when given):
    for products of more rows than `quant_gemv` takes, which then run as a dense matmul."""
    n, k = w.out_features, w.in_features
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=w.words.device)
    elif out.shape != (n, k) or out.stride(1) != 1 or out.stride(0) != k:
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor")
    block_n, block_k = 16, max(256, w.group)     # whole groups a tile
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](w.words, out_ptr=out, N=n, K=k, **kernel_operands(w), BLOCK_N=block_n,
                             BLOCK_K=block_k, R=INTERLEAVE, num_warps=4)
    return out


def _pdl(dependent_launch: bool) -> dict:
    return {"launch_pdl": True} if dependent_launch else {}


class RowInputs(NamedTuple):
    """One row as `quant_gemv_row` reads it (`row_inputs`)."""
    values: torch.Tensor          # float32 [per_word, K // per_word] permuted, or int32 [per_word // 4, K // per_word]
    scales: torch.Tensor | None   # int8 rows: [K // block] float32, each block's scale
    sums: torch.Tensor | None     # int8 rows: [K // block] float32, each block's sum of rounded x
    bits: int
    block: int                    # int8 rows: the block of x one scale covers; 0 for float32 rows


def row_block(x_dtype: torch.dtype, group: int) -> int:
    """The block a row of `x_dtype` is rounded to int8 in for a weight of `group`: 16-bit rows go through the
    integer kernel in blocks of min(32, group) (one scale of x within one of the weight's); float32 rows stay
    exact (0)."""
    return min(32, group) if x_dtype in (torch.bfloat16, torch.float16) else 0


def row_inputs(x: torch.Tensor, bits: int, *, block: int = 0, norm_weight: torch.Tensor | None = None,
               eps: float = 0.0, silu_mul: bool = False, dependent_launch: bool = False) -> RowInputs:
    """One row x [1, K] (or [1, 2K] of [gate | up] with `silu_mul`) as `quant_gemv_row` reads it: RMS-normed
    with `norm_weight`, or SiLU(gate) * up, rounded to x's dtype as the unfused kernels would, then in float32
    and permuted for codes of `bits` bits (`block` 0), or in int8 per `block` (`row_block`) and packed. One
    launch in place of the norm (or SiLU·mul) and a permutation. `dependent_launch`: as `triton_gemv.linear`'s
    (the norm's weight is read before the wait)."""
    k = x.shape[1] // (2 if silu_mul else 1)
    if x.shape[0] != 1 or x.stride(1) != 1:
        raise ValueError(f"row_inputs takes one contiguous row, got {list(x.shape)}")
    per_word = 32 // bits
    if block and (block & (block - 1) or block % per_word or k % block):
        raise ValueError(f"block must be a power of two, a multiple of {per_word} and divide {k}; got {block}")
    if block:
        values = torch.empty((per_word // 4, k // per_word), dtype=torch.int32, device=x.device)
        scales = torch.empty(k // block, dtype=torch.float32, device=x.device)
        sums = torch.empty(k // block, dtype=torch.float32, device=x.device)
    else:
        values = torch.empty((per_word, k // per_word), dtype=torch.float32, device=x.device)
        scales = sums = None
    tile = min(ROW_INPUTS_BLOCK, max(block, triton.next_power_of_2(k)))
    _row_inputs_kernel[(triton.cdiv(k, tile),)](x, norm_weight if norm_weight is not None else x, values,
                                                scales if block else values, sums if block else values, k, eps,
                                                PER_WORD=per_word, HAS_NORM=norm_weight is not None,
                                                SILU_MUL=silu_mul, QB=block, BLOCK=tile,
                                                NORM_BLOCK=min(4096, triton.next_power_of_2(k)),
                                                USE_PDL=dependent_launch, num_warps=4, **_pdl(dependent_launch))
    return RowInputs(values, scales, sums, bits, block)


def quant_gemv_row(inputs: RowInputs, w: QuantWeight, *, residual: torch.Tensor | None = None,
                   out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   config: QuantGemvConfig | None = None, dependent_launch: bool = False) -> torch.Tensor:
    """One row from `row_inputs` times the dequantized weight: [1, N] (into `out`, or `dtype` when new); with
    `residual` ([1, N], contiguous) the product is added into it, in place, and it is returned.
    `dependent_launch` (int8 rows): as `triton_gemv.linear`'s, the first weight tile streamed before the wait."""
    n, k = w.out_features, w.in_features
    if (inputs.bits != w.packing or inputs.values.shape[1] * (32 // w.packing) != k
            or (inputs.block and w.group % inputs.block) or (w.bits == 6 and inputs.block not in (0, 16))):
        raise ValueError(f"inputs must be row_inputs(x, bits={w.packing}) of a row of {k}, in blocks dividing "
                         f"{w.group}" + (" (six bits: 16)" if w.bits == 6 else ""))
    target = residual if residual is not None else out
    if target is None:
        target = torch.empty((1, n), dtype=dtype, device=inputs.values.device)
    elif target.shape != (1, n) or target.stride(1) != 1:
        raise ValueError(f"residual / out must be a [1, {n}] row")
    if inputs.block:
        config = config or ROW_Q8_CONFIGS[w.kind, triton.cdiv(n, INTERLEAVE) >= 4096]
        block_k = min(config.block_k, max(inputs.block, triton.next_power_of_2(k)))
        grid = (triton.cdiv(triton.cdiv(n, INTERLEAVE), config.block),)
        _quant_gemv_row_q8_kernel[grid](inputs.values, inputs.scales, inputs.sums, w.words, out_ptr=target,
                                        N=n, K=k, **kernel_operands(w),
                                        HAS_RESIDUAL=residual is not None, QB=inputs.block,
                                        EMULATE=os.environ.get("TRITON_INTERPRET") == "1", BLOCK_R=config.block,
                                        BLOCK_K=block_k, R=INTERLEAVE, USE_PDL=dependent_launch,
                                        num_warps=config.num_warps, num_stages=config.num_stages,
                                        **_pdl(dependent_launch))
        return target
    config = config or ROW_CONFIG
    block_k = min(config.block_k, max(w.group, triton.next_power_of_2(k)))
    grid = (triton.cdiv(triton.cdiv(n, INTERLEAVE), config.block),)
    _quant_gemv_row_kernel[grid](inputs.values, w.words, out_ptr=target, N=n, K=k, **kernel_operands(w),
                                 HAS_RESIDUAL=residual is not None, BLOCK_R=config.block, BLOCK_K=block_k,
                                 R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
    return target

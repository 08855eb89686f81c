"""Decode-sized matmuls over weights kept in 4 or 8 bits, dequantized in registers (issue 22's GPU path: the
kernels and their reference; the model does not call them yet).

A weight is w[n, k] = code[n, k] * scale[n, g] + zero[n, g], g = k // group: integer codes and, per group of
`group` consecutive K elements of an output row, a scale and (optionally) an offset. That one affine form holds
the formats a game ships: GGUF Q4_0 / Q8_0 (zero = -8 * scale / none), Q4_1 and Q4_K's sub-blocks (scale
d * sc, zero -dmin * m), gllm's own int4/int8 quantization.

Layout (`QuantWeight`, made by `QuantWeight.from_rows` once, at load): the codes as little-endian 32-bit words
(8 four-bit codes, element 8j + i in bits 4i..4i+3 of word j; or 4 int8 codes), and output rows interleaved in
fours: word j of rows 4a..4a+3 are one 16-byte vector, words[a, j, r]. A thread then loads four rows' codes
for the same K positions at once and multiplies them by the same x values: x is read from cache once for four
weights instead of once per weight, which was what bounded a row-major kernel (session 11, docs/benchmarks.md).
Scales and offsets are interleaved the same way; rows are padded to a multiple of four.

At batch 1 a linear layer's time is its weight's bytes over memory bandwidth, so reading 4.5 bits a weight
instead of 16 is the whole point. Each program owns whole output rows over all of K (no split-K: one fixed
summation order, no atomics); products accumulate in float32 and are rounded to x's dtype, as a linear's are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 8        # more rows: dequantize once (`dequantize`) and use a dense matmul
INTERLEAVE = 4      # output rows sharing one 16-byte vector of codes


class QuantWeight(NamedTuple):
    words: torch.Tensor            # [ceil(N / 4), K // codes_per_word, 4] int32
    scale: torch.Tensor            # [ceil(N / 4), K // group, 4] float16
    zero: torch.Tensor | None      # like scale, or None (w = code * scale)
    bits: int
    group: int
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.words, self.scale, self.zero) if t is not None)

    @staticmethod
    def from_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  group: int) -> QuantWeight:
        """Row-major codes ([N, K // 2] uint8 packed by `pack_int4` for 4 bits, [N, K] int8 for 8) and
        [N, K // group] scales/offsets, in the kernels' layout."""
        n = codes.shape[0]
        per_word = 32 // bits
        k = codes.shape[1] * (2 if bits == 4 else 1)
        if k % group or group % per_word:
            raise ValueError(f"in_features {k} must be a multiple of the group {group}, itself of {per_word}")
        words = codes.contiguous().view(torch.int32)
        pad = -n % INTERLEAVE

        def interleave(t: torch.Tensor) -> torch.Tensor:
            t = torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
            return t.view(-1, INTERLEAVE, t.shape[1]).transpose(1, 2).contiguous()

        return QuantWeight(interleave(words), interleave(scale.half()),
                           None if zero is None else interleave(zero.half()), bits, group, k, n)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Row-major [N, K // codes_per_word] words and [N, K // group] scales/offsets (the inverse of
        `from_rows`)."""
        def deinterleave(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(-1, t.shape[1])[:self.out_features]
        return (deinterleave(self.words), deinterleave(self.scale),
                None if self.zero is None else deinterleave(self.zero))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (any integer dtype) as [N, K // 2] uint8, element 2j low, 2j + 1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: [N, K] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weights (the reference for the kernels, and the prefill path: dequantize once, then a dense
    matmul)."""
    words, scale, zero = w.rows()
    raw = words.contiguous().view(torch.uint8 if w.bits == 4 else torch.int8)
    codes = unpack_int4(raw) if w.bits == 4 else raw
    out = codes.float() * scale.float().repeat_interleave(w.group, dim=1)
    if zero is not None:
        out += zero.float().repeat_interleave(w.group, dim=1)
    return out.to(dtype)


def quantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool | None = None) -> QuantWeight:
    """Round-to-nearest grouped quantization of a float [N, K] weight (for tests and benchmarks; the formats a
    file ships are repacked, not requantized). Four bits: asymmetric (scale and zero per group) unless asked;
    eight bits: symmetric."""
    n, k = weight.shape
    if k % group or group % 2:
        raise ValueError(f"in_features {k} must be a multiple of an even group size, got group {group}")
    symmetric = bits == 8 if symmetric is None else symmetric
    w = weight.float().view(n, k // group, group)
    if symmetric:
        top = (1 << (bits - 1)) - 1
        scale = (w.abs().amax(dim=-1) / top).clamp_min(1e-12)
        scale = scale.half().float()   # the codes are chosen against the scale as stored
        codes = torch.round(w / scale[..., None]).clamp(-top, top)
        zero = None
        if bits == 4:   # stored 0..15 with the offset in zero
            codes, zero = codes + 8, (-8 * scale).half()
    else:
        top = (1 << bits) - 1
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / top).clamp_min(1e-12).half().float()
        zero = lo.half()
        codes = torch.round((w - zero.float()[..., None]) / scale[..., None]).clamp(0, top)
    codes = codes.view(n, k)
    q = pack_int4(codes) if bits == 4 else codes.to(torch.int8)
    return QuantWeight.from_rows(q, scale.half(), zero, bits, group)


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


def quant_gemv(x: torch.Tensor, w: QuantWeight, config: QuantGemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times the dequantized weight, transposed: [M, N] in x's dtype."""
    m, k = x.shape
    if k != w.in_features or m > MAX_ROWS:
        raise ValueError(f"quant_gemv takes [<= {MAX_ROWS}, {w.in_features}] inputs, got {list(x.shape)}")
    n, per_word = w.out_features, 32 // w.bits
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    zero = w.zero if w.zero is not None else w.scale
    if m == 1:
        config = config or ROW_CONFIG
        xp = x.float().view(k // per_word, per_word).t().contiguous()   # xp[i, j] = x[per_word * j + i]
        block_k = min(config.block_k, max(w.group, triton.next_power_of_2(k)))
        grid = (triton.cdiv(triton.cdiv(n, INTERLEAVE), config.block),)
        _quant_gemv_row_kernel[grid](xp, w.words, w.scale, zero, out, n, k, GROUP=w.group, BITS=w.bits,
                                     HAS_ZERO=w.zero is not None, BLOCK_R=config.block, BLOCK_K=block_k,
                                     R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    config = config or ROWS_CONFIG
    xp = x.view(m, k // per_word, per_word).transpose(1, 2).contiguous()   # xp[m, i, j] = x[m, per_word * j + i]
    block_k = min(config.block_k, max(per_word * 16, triton.next_power_of_2(k)))
    _quant_gemv_rows_kernel[(triton.cdiv(n, config.block),)](
        xp, w.words, w.scale, zero, out, m, n, k, out.stride(0), GROUP=w.group, BITS=w.bits,
        HAS_ZERO=w.zero is not None, ROWS=max(16, triton.next_power_of_2(m)), BLOCK_N=config.block,
        BLOCK_K=block_k, R=INTERLEAVE, num_warps=config.num_warps, num_stages=config.num_stages)
    return out

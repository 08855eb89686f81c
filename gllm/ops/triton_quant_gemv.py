"""Decode-sized matmuls over weights kept in 4 or 8 bits, dequantized in registers (a first step of issue 22's GPU
path: the kernel and its reference; the model does not call it yet).

A weight is stored as `QuantWeight`: integer codes q, and per group of `group` consecutive K elements of an
output row a scale and (optionally) an offset, so w[n, k] = q[n, k] * scale[n, g] + zero[n, g], g = k // group.
That one affine form holds the formats a game ships: GGUF Q4_0 / Q8_0 (zero = -8 * scale / none), Q4_1 and
Q4_K's sub-blocks (scale d * sc, zero -dmin * m), gllm's own int4/int8 quantization. Four-bit codes are packed
two a byte, element 2j in the low nibble of byte j, element 2j + 1 in the high one; eight-bit codes are int8.

At batch 1 a linear layer's time is its weight's bytes over memory bandwidth, so reading 4.5 bits a weight
instead of 16 is the whole point: each program owns `BLOCK_N` output columns over all of K (no split-K: one
fixed summation order, no atomics), loads each weight tile once and uses it for every row (up to `MAX_ROWS`).
The product accumulates in float32 and is rounded to x's dtype, as a linear's output would be.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 8   # more rows: dequantize once (`dequantize`) and use a dense matmul


class QuantWeight(NamedTuple):
    q: torch.Tensor                # [N, K // 2] uint8 (bits 4) or [N, K] int8 (bits 8)
    scale: torch.Tensor            # [N, K // group] float16
    zero: torch.Tensor | None      # [N, K // group] float16, or None (w = q * scale)
    bits: int
    group: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (any integer dtype) as [N, K // 2] uint8, element 2j low, 2j + 1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: [N, K] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weights (the reference for the kernel, and the prefill path: dequantize once, then a dense matmul)."""
    codes = unpack_int4(w.q) if w.bits == 4 else w.q
    scale = w.scale.float().repeat_interleave(w.group, dim=1)
    out = codes.float() * scale
    if w.zero is not None:
        out += w.zero.float().repeat_interleave(w.group, dim=1)
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
    return QuantWeight(q.contiguous(), scale.half().contiguous(), None if zero is None else zero.contiguous(),
                       bits, group, k)


@triton.jit
def _quant_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # The codes are read as 32-bit words (8 four-bit or 4 eight-bit codes: 16-byte loads along K). A code
    # becomes a float without a conversion instruction: OR-ed into the mantissa of 2^23 and the 2^23 taken off
    # again (exact). Each word's codes are multiplied by x and summed in the thread; the group's scale (and
    # offset times the sum of x) is applied once per word, and the sum over K is reduced once, at the end.
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    MASK: tl.constexpr = (1 << BITS) - 1
    FLIP: tl.constexpr = 0 if BITS == 4 else 0x80            # int8: two's complement to offset-128 binary
    OFFSET: tl.constexpr = 8388608.0 if BITS == 4 else 8388736.0   # 2^23 (+ 128 for int8)
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    rows = tl.arange(0, ROWS)
    m_ok = rows < M
    row_words = K // PER_WORD
    groups = K // GROUP
    shifts = BITS * tl.arange(0, PER_WORD)
    lanes = tl.arange(0, PER_WORD)
    acc = tl.zeros([ROWS, BLOCK_N, WORDS], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        js = k0 // PER_WORD + tl.arange(0, WORDS)
        j_ok = js < row_words
        w_ok = n_ok[:, None] & j_ok[None, :]
        words = tl.load(w_ptr + ns[:, None] * row_words + js[None, :], mask=w_ok, other=0)
        codes = (((words[:, :, None] >> shifts[None, None, :]) & MASK) ^ FLIP) | 0x4B000000
        q = codes.to(tl.float32, bitcast=True) - OFFSET                            # [BLOCK_N, WORDS, PER_WORD]
        ks = js[:, None] * PER_WORD + lanes[None, :]
        x = tl.load(x_ptr + rows[:, None, None] * stride_xm + ks[None, :, :],
                    mask=m_ok[:, None, None] & j_ok[None, :, None], other=0.0).to(tl.float32)  # [ROWS, WORDS, PER_WORD]
        part = tl.sum(x[:, None, :, :] * q[None, :, :, :], axis=3)                # [ROWS, BLOCK_N, WORDS]
        g = (js * PER_WORD) // GROUP
        s = tl.load(s_ptr + ns[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
        acc += part * s[None, :, :]
        if HAS_ZERO:
            z = tl.load(z_ptr + ns[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
            acc += tl.sum(x, axis=2)[:, None, :] * z[None, :, :]
    out = tl.sum(acc, axis=2).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _quant_gemv_row_kernel(xp_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K,
                           GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One row of x. The codes are loaded as [BLOCK_N, groups, words of a group] 32-bit words (a group of 32
    # four-bit codes is one 16-byte load). The i-th code of every word is taken out in turn and OR-ed into the
    # top of the mantissa of 1.0: f = 1 + u / 2^BITS, exact, with no conversion instruction (u: the code as
    # offset binary). x comes permuted and in float32 (xp[i, j] = x[PER_WORD * j + i]), so its values for code
    # i are one contiguous load. Per group: sum(u x) = 2^BITS (sum(f x) - sum(x)); the scale and offset are
    # applied once per group, and the sum along K is reduced once, at the end.
    PER_WORD: tl.constexpr = 32 // BITS
    GROUP_WORDS: tl.constexpr = GROUP // PER_WORD
    GROUPS: tl.constexpr = BLOCK_K // GROUP
    MASK: tl.constexpr = (1 << BITS) - 1
    TOP: tl.constexpr = 23 - BITS                           # where a code sits in the mantissa
    FLIP: tl.constexpr = 0 if BITS == 4 else 0x80            # int8: two's complement to offset binary
    SPAN: tl.constexpr = 1 << BITS
    BIAS: tl.constexpr = 0.0 if BITS == 4 else 128.0         # int8: code = u - 128
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    row_words = K // PER_WORD
    groups = K // GROUP
    in_group = tl.arange(0, GROUP_WORDS)
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in range(0, groups, GROUPS):
        gs = g0 + tl.arange(0, GROUPS)
        g_ok = gs < groups
        js = gs[:, None] * GROUP_WORDS + in_group[None, :]                           # [GROUPS, GROUP_WORDS]
        w_ok = n_ok[:, None, None] & g_ok[None, :, None]
        words = tl.load(w_ptr + ns[:, None, None] * row_words + js[None, :, :], mask=w_ok, other=0)
        part = tl.zeros([BLOCK_N, GROUPS, GROUP_WORDS], dtype=tl.float32)
        x_sum = tl.zeros([GROUPS, GROUP_WORDS], dtype=tl.float32)
        for i in tl.static_range(PER_WORD):
            xi = tl.load(xp_ptr + i * row_words + js, mask=g_ok[:, None], other=0.0)
            if TOP >= BITS * i:
                moved = words << (TOP - BITS * i)
            else:
                moved = words >> (BITS * i - TOP)
            if FLIP:
                moved = moved ^ (FLIP << TOP)
            f = ((moved & (MASK << TOP)) | 0x3F800000).to(tl.float32, bitcast=True)
            part += f * xi[None, :, :]
            x_sum += xi
        fx = tl.sum(part, axis=2)                                                    # [BLOCK_N, GROUPS]
        xs = tl.sum(x_sum, axis=1)[None, :]                                          # [1, GROUPS]
        scale = tl.load(s_ptr + ns[:, None] * groups + gs[None, :], mask=n_ok[:, None] & g_ok[None, :],
                        other=0.0).to(tl.float32)
        acc += scale * (SPAN * (fx - xs) - BIAS * xs)
        if HAS_ZERO:
            zero = tl.load(z_ptr + ns[:, None] * groups + gs[None, :], mask=n_ok[:, None] & g_ok[None, :],
                           other=0.0).to(tl.float32)
            acc += zero * xs
    out = tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + ns, out, mask=n_ok)


class QuantGemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = QuantGemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=2)


def quant_gemv(x: torch.Tensor, w: QuantWeight, config: QuantGemvConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS) times the dequantized weight, transposed: [M, N] in x's dtype."""
    m, k = x.shape
    if k != w.in_features or m > MAX_ROWS:
        raise ValueError(f"quant_gemv takes [<= {MAX_ROWS}, {w.in_features}] inputs, got {list(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n = w.out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    rows = max(1, triton.next_power_of_2(m))
    per_word = 32 // w.bits
    if w.group % per_word or w.q.stride(-1) != 1:
        raise ValueError(f"quant_gemv needs groups of a multiple of {per_word} codes and contiguous codes")
    words = w.q.view(torch.int32)            # [N, K // per_word]: the codes as little-endian 32-bit words
    block_k = min(config.block_k, max(w.group, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, config.block_n),)
    if m == 1:
        xp = x.float().view(k // per_word, per_word).t().contiguous()   # xp[i, j] = x[per_word * j + i]
        _quant_gemv_row_kernel[grid](xp, words, w.scale, w.zero if w.zero is not None else w.scale, out, n, k,
                                     GROUP=w.group, BITS=w.bits, HAS_ZERO=w.zero is not None,
                                     BLOCK_N=config.block_n, BLOCK_K=block_k,
                                     num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    _quant_gemv_kernel[grid](x, words, w.scale, w.zero if w.zero is not None else w.scale, out, m, n, k,
                             x.stride(0), out.stride(0), GROUP=w.group, BITS=w.bits, HAS_ZERO=w.zero is not None,
                             ROWS=rows, BLOCK_N=config.block_n, BLOCK_K=block_k,
                             num_warps=config.num_warps, num_stages=config.num_stages)
    return out

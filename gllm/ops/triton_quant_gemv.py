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
def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                       GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = ns < N
    rows = tl.arange(0, ROWS)
    m_ok = rows < M
    groups = K // GROUP
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if BITS == 4:
        HALF: tl.constexpr = BLOCK_K // 2
        for k0 in range(0, K, BLOCK_K):
            js = k0 // 2 + tl.arange(0, HALF)              # byte j holds elements 2j and 2j + 1
            j_ok = js < K // 2
            w_ok = n_ok[:, None] & j_ok[None, :]
            b = tl.load(q_ptr + ns[:, None] * (K // 2) + js[None, :], mask=w_ok, other=0)
            g = (2 * js) // GROUP
            s = tl.load(s_ptr + ns[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
            lo = (b & 0xF).to(tl.float32) * s
            hi = (b >> 4).to(tl.float32) * s
            if HAS_ZERO:
                z = tl.load(z_ptr + ns[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
                lo += z
                hi += z
            x_ok = m_ok[:, None] & j_ok[None, :]
            xe = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * js[None, :], mask=x_ok, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + rows[:, None] * stride_xm + 2 * js[None, :] + 1, mask=x_ok,
                         other=0.0).to(tl.float32)
            acc += tl.sum(xe[:, None, :] * lo[None, :, :] + xo[:, None, :] * hi[None, :, :], axis=2)
    else:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w_ok = n_ok[:, None] & k_ok[None, :]
            q = tl.load(q_ptr + ns[:, None] * K + ks[None, :], mask=w_ok, other=0)
            g = ks // GROUP
            w = q.to(tl.float32) * tl.load(s_ptr + ns[:, None] * groups + g[None, :], mask=w_ok,
                                           other=0.0).to(tl.float32)
            if HAS_ZERO:
                w += tl.load(z_ptr + ns[:, None] * groups + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_om + ns[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


class QuantGemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_CONFIG = QuantGemvConfig(block_n=8, block_k=256)


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
    grid = (triton.cdiv(n, config.block_n),)
    _quant_gemv_kernel[grid](x, w.q, w.scale, w.zero if w.zero is not None else w.scale, out, m, n, k,
                             x.stride(0), out.stride(0), GROUP=w.group, BITS=w.bits, HAS_ZERO=w.zero is not None,
                             ROWS=rows, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                             num_warps=config.num_warps, num_stages=config.num_stages)
    return out

"""Weight-only quantized matrix products: int8 per output channel, int4 in groups along K.

The weights stay quantized in memory; the products go through torch's own weight-only kernels, which read the
packed weights and scale in the kernel (`torch._weight_int8pack_mm`; `torch._weight_int4pack_mm_for_cpu`, whose
packing `torch._convert_weight_to_int4pack_for_cpu` does once at load). Activations keep the model's dtype.

    int8:  w[n, k] = q[n, k] * scale[n]                           q in [-127, 127]
    int4:  w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]      q in [0, 15], g = k // group_size

(the int4 form is torch's: `zero` is the value of q = 8, so an affine group min + scale * q maps onto it
exactly; GGUF's Q4_0, Q4_1 and Q4_K blocks are of that form too.)

An int4 weight may hold its K inputs as several planes (`planes` > 1: GGUF's 5, 6 and 8-bit blocks, see
`gllm.formats.gguf_quants`): the kernel then sees `planes` x K inputs, chunk by chunk each plane's values side
by side, and the activations are widened to match (each chunk repeated once a plane, times the plane's
multiplier) — one kernel call, exact, at twice the kernel's work. A projection whose parts differ in layout is a
`StackedWeight`: one product a part, outputs side by side.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)
_INNER_K_TILES = 2       # the CPU int4 packing's K tiling (16 values a tile); K must be a multiple of 32


@dataclass
class Int8Weight:
    q: torch.Tensor           # [N, K] int8
    scale: torch.Tensor       # [N], the activations' dtype

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


@dataclass
class Int4Weight:
    packed: torch.Tensor              # torch's CPU int4 packing of q [N, K]
    scales_and_zeros: torch.Tensor    # [K // group_size, N, 2]: (scale, zero) per group, the activations' dtype
    group_size: int
    n: int
    k: int                            # the inputs the layer takes (the kernel sees planes x k)
    planes: int = 1
    chunk: int = 32                   # planes > 1: inputs a chunk
    multipliers: torch.Tensor | None = None   # planes > 1: [planes], the activations' dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + \
            self.scales_and_zeros.numel() * self.scales_and_zeros.element_size()

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        """Activations [M, k] -> [M, planes * k] as the planes expect them (see the module docstring)."""
        if self.planes == 1:
            return x
        m = x.shape[0]
        chunks = x.reshape(m, self.k // self.chunk, 1, self.chunk)
        return (chunks * self.multipliers.view(1, 1, self.planes, 1)).reshape(m, self.planes * self.k)


@dataclass
class StackedWeight:
    """Row blocks of one projection in different layouts (a fused q/k/v whose parts a file stores in different
    types): one product a part, concatenated along N."""
    parts: tuple[Int8Weight | Int4Weight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(p.shape[0] for p in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


QuantizedWeight = Int8Weight | Int4Weight | StackedWeight


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Symmetric int8 per output channel (round to nearest); scales in `dtype`."""
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.to(dtype))


def check_int4_shape(n: int, k: int, group_size: int) -> str | None:
    """Why a [n, k] weight cannot be int4 in groups of `group_size`; None when it can."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group size must be one of {INT4_GROUP_SIZES}, got {group_size}"
    if k % group_size:
        return f"K ({k}) is not a multiple of the group size ({group_size})"
    if k % (16 * _INNER_K_TILES) or n % 16:
        return f"int4 packing needs K % {16 * _INNER_K_TILES} == 0 and N % 16 == 0, got N={n}, K={k}"
    return None


def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> Int4Weight:
    """Asymmetric int4 in groups of `group_size` along K (each group's min and max map to 0 and 15)."""
    n, k = w.shape
    problem = check_int4_shape(n, k, group_size)
    if problem:
        raise ValueError(f"int4: {problem}")
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return pack_int4(q, scale, lo, group_size, dtype)


def pack_int4(q: torch.Tensor, scale: torch.Tensor, group_min: torch.Tensor, group_size: int,
              dtype: torch.dtype, multipliers: tuple[float, ...] = (1.0,), chunk: int = 32) -> Int4Weight:
    """From q [N, K'] in [0, 15] with w = group_min + scale * q per group ([N, K' // group_size] each).
    With several `multipliers`, K' holds that many planes of the layer's K inputs, `chunk` at a time."""
    n, k = q.shape
    planes = len(multipliers)
    problem = check_int4_shape(n, k, group_size)
    if problem or k % (planes * chunk):
        raise ValueError(f"int4: {problem or f'{k} values do not hold {planes} planes in chunks of {chunk}'}")
    packed = _pack_rows(q)
    zero = group_min.float() + 8.0 * scale.float()          # torch's zero: the value of q = 8
    scales_and_zeros = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
    mult = torch.tensor(multipliers, dtype=dtype) if planes > 1 else None
    return Int4Weight(packed, scales_and_zeros, group_size, n, k // planes, planes, chunk, mult)


# Output rows packed at a time: a multiple of every layout's block (64 rows), so the pieces are the whole's
# bytes in order. torch packs from an int32 copy (4 bytes a code): made for 4,096 rows at a time, not for the
# whole weight (the default model's head as two planes: 226 MB, which set the load's peak).
_PACK_ROWS = 4096
_PACK_ROWS_BLOCK = 64      # the largest layout's block of rows (avx512)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 packing of q [N, K] (values 0..15, any integer dtype), a block of rows at a time."""
    n, k = q.shape
    if n <= _PACK_ROWS:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), _INNER_K_TILES)
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    for start in range(0, n, _PACK_ROWS):
        piece = q[start:start + _PACK_ROWS].to(torch.int32).contiguous()
        out[start:start + piece.shape[0]] = torch._convert_weight_to_int4pack_for_cpu(piece, _INNER_K_TILES)
    return out


def concat_int4(pieces: list[Int4Weight]) -> Int4Weight:
    """One weight from pieces stacked along N (every piece but the last a multiple of 64 rows, so that the
    packed bytes are the whole's in order), for weights too large to pack at once."""
    first = pieces[0]
    if any(p.k != first.k or p.planes != first.planes or p.chunk != first.chunk or p.group_size != first.group_size
           for p in pieces) or any(p.n % _PACK_ROWS_BLOCK for p in pieces[:-1]):
        raise ValueError("int4 pieces stack only with the same K, planes and groups, and whole row blocks")
    return Int4Weight(torch.cat([p.packed for p in pieces]), torch.cat([p.scales_and_zeros for p in pieces], dim=1),
                      first.group_size, sum(p.n for p in pieces), first.k, first.planes, first.chunk,
                      first.multipliers)


def quant_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ w.T -> [..., N] in x's dtype, reading w quantized. The kernels compute in the scales' dtype
    (x is cast to it); wide products take x as it is, in float32."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _matmul_2d(x2, weight).to(x.dtype)
    return y.reshape(*lead, y.shape[-1])


# Rows from which an int4 product dequantizes its weight, a block of output rows at a time, and runs one float32
# GEMM instead of the int4 kernel (a GEMV at heart: its cost grows with the rows, and twice as fast with two
# planes). One 3072 x 576 product on 2 cores, one plane / two: 29 / 67 ms in the kernel at 256 rows against
# 19 / 39 ms dequantized (16.5 ms for the float32 GEMM alone); even at 128 rows. Halved for two planes.
WIDE_ROWS = 256
_WIDE_BLOCK = 1024          # output rows dequantized at a time: a few MB of float32, not the whole weight


def _matmul_2d(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    if isinstance(weight, Int8Weight):
        return torch._weight_int8pack_mm(x.to(weight.scale.dtype), weight.q, weight.scale)
    if isinstance(weight, StackedWeight):
        return torch.cat([_matmul_2d(x, part) for part in weight.parts], dim=-1)
    if x.shape[0] * weight.planes >= WIDE_ROWS and weight.n % 32 == 0 and \
            packing_layout(weight.n, weight.k * weight.planes) is not None:
        return _wide_matmul(x, weight)
    dtype = weight.scales_and_zeros.dtype
    return torch._weight_int4pack_mm_for_cpu(weight.widen(x.to(dtype)), weight.packed, weight.group_size,
                                             weight.scales_and_zeros)


def _wide_matmul(x: torch.Tensor, weight: Int4Weight) -> torch.Tensor:
    x32 = x.float()
    out = torch.empty(x.shape[0], weight.n, dtype=torch.float32)
    for start in range(0, weight.n, _WIDE_BLOCK):
        stop = min(start + _WIDE_BLOCK, weight.n)
        torch.matmul(x32, dequantize_t(weight, start, stop), out=out[:, start:stop])
    return out


# torch's CPU int4 packing depends on the instruction set its kernels were dispatched for: blocks of 32 output
# rows on AVX2 (byte (k, i): rows i and 16 + i), of 64 on AVX-512 (bytes (k, i) and (k, 16 + i): rows i, 32 + i
# and 16 + i, 48 + i; a last block of fewer rows as adjacent pairs), adjacent pairs without vector kernels.
_LAYOUTS = ("avx2", "avx512", "pairs")


@functools.lru_cache(maxsize=64)
def packing_layout(n: int, k: int) -> str | None:
    """Which of `_LAYOUTS` torch packs an [n, k] int4 weight in here, found by packing a random one and reading
    it back (None: none of them; wide products then keep the kernel)."""
    probe = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=torch.Generator().manual_seed(n * 7919 + k))
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, _INNER_K_TILES)
    want = probe.t().to(torch.uint8)
    for layout in _LAYOUTS:
        try:
            if torch.equal(_codes(packed, n, k, 0, n, layout), want):
                return layout
        except RuntimeError:   # the bytes do not split into this layout's blocks
            continue
    return None


def _codes(packed: torch.Tensor, n: int, k: int, start: int, stop: int, layout: str) -> torch.Tensor:
    """Codes [k, stop - start] (uint8, 0..15) of output rows [start, stop) from torch's packing (`start` on a
    block boundary; `stop` too, or n)."""
    block = 64 if layout == "avx512" else 32
    flat = packed.reshape(-1)
    whole = min(stop, n // block * block)
    parts = []
    if whole > start:
        b = flat[start * k // 2:whole * k // 2].view((whole - start) // block, k, block // 2)
        if layout == "avx2":
            q = torch.stack([b & 15, b >> 4], dim=2)                            # [nb, k, nibble, 16]
        elif layout == "avx512":
            b = b.view(b.shape[0], k, 2, 16)
            q = torch.stack([b & 15, b >> 4], dim=2)                            # [nb, k, nibble, half, 16]
        else:
            q = torch.stack([b & 15, b >> 4], dim=3)                            # [nb, k, pair, nibble]
        parts.append(q.transpose(0, 1).reshape(k, whole - start))
    if stop > whole:   # a last block of fewer rows: adjacent pairs
        b = flat[whole * k // 2:stop * k // 2].view(k, (stop - whole) // 2)
        parts.append(torch.stack([b & 15, b >> 4], dim=2).reshape(k, stop - whole))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def dequantize_t(weight: Int4Weight, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Output rows [start, stop) of an int4 weight (multiples of 32), dequantized and transposed: float32
    [k, stop - start] (for a weight whose `packing_layout` is known)."""
    stop = weight.n if stop is None else stop
    n, kp = stop - start, weight.k * weight.planes
    layout = packing_layout(weight.n, kp)
    if layout is None:
        raise ValueError("torch's int4 packing here is none of the layouts gllm reads")
    q = _codes(weight.packed, weight.n, kp, start, stop, layout).view(kp // weight.group_size, weight.group_size, n)
    sz = weight.scales_and_zeros[:, start:stop].float()
    scale, offset = sz[..., 0:1].transpose(1, 2), (sz[..., 1] - 8 * sz[..., 0]).unsqueeze(1)
    w = torch.addcmul(offset, q.float(), scale).view(kp, n)
    if weight.planes > 1:
        w = (w.view(weight.k // weight.chunk, weight.planes, weight.chunk, n)
             * weight.multipliers.float().view(1, -1, 1, 1)).sum(1).view(weight.k, n)
    return w

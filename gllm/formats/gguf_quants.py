"""GGUF's quantized blocks read as int4 planes: every weight as one or two 4-bit values, each plane with a scale
and an offset per 32 of its values — the form torch's CPU int4 kernel takes — straight from the blocks' bits
(no float weights in between, no requantization).

A row of K weights becomes `planes` x K values q in [0, 15], grouped 32 to a (scale, group_min), with

    w[k] = sum over planes p of  multiplier[p] * (group_min + scale * q)      (the group that holds q)

where the activations are widened to match: chunk by chunk (`chunk` weights), the plane values of a chunk sit
side by side, and activation x[k] meets plane p's value multiplied by `multiplier[p]`. Per type:

    Q4_0  d, 4-bit q                  w = d (q - 8)               1 plane
    Q4_1  d, m, 4-bit q               w = d q + m                 1 plane
    Q4_K  256: d, dmin, 8 x 6-bit (sc, m) for 32 each, 4-bit q
                                      w = d sc q - dmin m         1 plane
    Q5_0  d, 5-bit q = 16 h + l       w = d (q - 16)              planes l (scale d, min -16 d), h (16 d, 0)
    Q5_1  d, m, 5-bit q               w = d q + m                 planes l (d, m), h (16 d, 0)
    Q5_K  as Q4_K with 5-bit q        w = d sc q - dmin m         planes l (d sc, -dmin m), h (16 d sc, 0)
    Q8_0  d, int8 q; q + 128 = 16 h + l
                                      w = d q                     planes l (d, 0), h (16 d, -128 d)
    Q6_K  256: d, 16 x int8 sc for 16 each, 6-bit q = 16 a + b
                                      w = d sc (q - 32)           planes b (d sc, -8 d sc) and 2a + 5 (same,
                                                                  x8): chunks of 16, so one sub-block's two
                                                                  planes share a group of 32 and its scale

(Q6_K: d sc (16 a + b - 32) = d sc (b - 8) + 8 d sc (2 a + 5 - 8), and 8 is a power of two, exact in any float.)
The planes are exact: only the float format of the scales (the kernel's, e.g. bfloat16) rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32          # values per (scale, group_min) in every plane
_QK_K = 256         # a K-quant super-block


@dataclass(frozen=True)
class Int4Planes:
    """One tensor's rows as int4 planes (see the module docstring)."""
    q: np.ndarray                       # uint8 [rows, planes * k], values 0..15
    scale: np.ndarray                   # float32 [rows, planes * k / 32]
    group_min: np.ndarray               # float32 [rows, planes * k / 32]
    chunk: int                          # weights a chunk: their planes' values sit side by side
    multipliers: tuple[float, ...]      # per plane: what the activations are multiplied by

    @property
    def layout(self) -> tuple[int, tuple[float, ...]]:
        """Tensors with the same layout can be stacked along their rows and share one product."""
        return (self.chunk, self.multipliers) if len(self.multipliers) > 1 else (GROUP, (1.0,))

    def rows(self, index: np.ndarray) -> Int4Planes:
        """The same planes with the rows reordered (or selected) by `index`."""
        return Int4Planes(self.q[index], self.scale[index], self.group_min[index], self.chunk, self.multipliers)


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [rows, blocks]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 2, n]: the low nibbles, then the high ones."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bits(qh: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> [..., 8 n] bits, little-endian (bit j of byte i is bit 8 i + j)."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit (scale, min) for 8 sub-blocks -> two uint8 [..., 8].
    Sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7: the low and high
    nibbles of bytes 8-11, with their top 2 bits in the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _interleave(values: list[np.ndarray], scales: list[np.ndarray], mins: list[np.ndarray],
                chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-plane values [rows, n_chunks, chunk] side by side chunk by chunk, and their per-group scale and min
    [rows, n_groups] in the same order."""
    rows = values[0].shape[0]
    q = np.stack(values, axis=2).reshape(rows, -1)
    if len(values) > 1 and chunk < GROUP:       # both planes of a chunk in one group (Q6_K): one scale for both
        return q, scales[0], mins[0]
    return q, np.stack(scales, axis=2).reshape(rows, -1), np.stack(mins, axis=2).reshape(rows, -1)


def _q4_0(b: np.ndarray):
    d = _f16(b, 0)
    return [_nibbles(b[..., 2:18])], [d], [-8.0 * d]


def _q4_1(b: np.ndarray):
    return [_nibbles(b[..., 4:20])], [_f16(b, 0)], [_f16(b, 2)]


def _q5_bits(b: np.ndarray, at: int) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 / Q5_1 (their 4 bytes of high bits at `at`): the low 4 bits and the high bit of every weight's q,
    [rows, blocks, 32] each."""
    return _nibbles(b[..., at + 4:at + 20]).reshape(*b.shape[:2], 32), _bits(b[..., at:at + 4])


def _q5(b: np.ndarray, d: np.ndarray, m: np.ndarray, at: int):
    low, high = _q5_bits(b, at)
    return [low, high], [d, 16.0 * d], [m, np.zeros_like(d)]


def _q8_0(b: np.ndarray):
    d = _f16(b, 0)
    u = (b[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return [u & 0x0F, u >> 4], [d, 16.0 * d], [np.zeros_like(d), -128.0 * d]


def _k_lead(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: per 32-weight sub-block, [rows, blocks, 8] scale (d sc) and min (-dmin m)."""
    sc, mn = _k_scales(b[..., 4:16])
    return _f16(b, 0)[..., None] * sc, -_f16(b, 2)[..., None] * mn


def _k_low(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> [..., 8, 32]: 32 bytes hold sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)."""
    return _nibbles(qs.reshape(*qs.shape[:-1], 4, 32)).reshape(*qs.shape[:-1], 8, 32)


def _q4_k(b: np.ndarray):
    scale, mn = _k_lead(b)
    return [_k_low(b[..., 16:144])], [scale], [mn]


def _k5_high(b: np.ndarray) -> np.ndarray:
    """Q5_K: the high bit of every weight's q, [rows, blocks, 8, 32] (bit j of byte i: sub-block j, weight i)."""
    return (b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1


def _q5_k(b: np.ndarray):
    scale, mn = _k_lead(b)
    return [_k_low(b[..., 48:176]), _k5_high(b)], [scale, 16.0 * scale], [mn, np.zeros_like(mn)]


def _q6_k_parts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K: per 16-weight sub-block, [rows, blocks, 16, 16] low 4 bits and high 2 bits of q, and the scale d sc
    [rows, blocks, 16]."""
    lead = b.shape[:-1]
    # weight 128 h + 32 s + i: low 4 bits in byte 64 h + 32 (s % 2) + i (nibble s // 2), high 2 bits in
    # byte 128 + 32 h + i (bits 2 s)
    ql = b[..., 0:128].reshape(*lead, 2, 2, 32)                             # [.., h, s % 2, i]
    low = np.stack([ql & 0x0F, ql >> 4], axis=-3).reshape(*lead, 2, 4, 32)  # [.., h, s = 2 nibble + s % 2, i]
    qh = b[..., 128:192].reshape(*lead, 2, 1, 32)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3          # [.., h, s, i]
    scale = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)   # [.., 16]
    return low.reshape(*lead, 16, 16), high.reshape(*lead, 16, 16), scale


def _q6_k(b: np.ndarray):
    low, high, scale = _q6_k_parts(b)
    return [low, 2 * high + 5], [scale, scale], [-8.0 * scale, -8.0 * scale]


# type -> (block weights, block bytes, decoder, chunk, multipliers)
_TYPES = {
    "Q4_0": (32, 18, _q4_0, 32, (1.0,)),
    "Q4_1": (32, 20, _q4_1, 32, (1.0,)),
    "Q4_K": (_QK_K, 144, _q4_k, 32, (1.0,)),
    "Q5_0": (32, 22, lambda b: _q5(b, _f16(b, 0), -16.0 * _f16(b, 0), 2), 32, (1.0, 1.0)),
    "Q5_1": (32, 24, lambda b: _q5(b, _f16(b, 0), _f16(b, 2), 4), 32, (1.0, 1.0)),
    "Q5_K": (_QK_K, 176, _q5_k, 32, (1.0, 1.0)),
    "Q8_0": (32, 34, _q8_0, 32, (1.0, 1.0)),
    "Q6_K": (_QK_K, 210, _q6_k, 16, (1.0, 8.0)),
}
PLANE_TYPES = tuple(_TYPES)
INT4_TYPES = tuple(t for t, spec in _TYPES.items() if len(spec[4]) == 1)     # one plane: 4 bits a weight


def int4_planes(type_name: str, data: np.ndarray, k: int) -> Int4Planes:
    """A tensor's rows (`data`: [rows, bytes] uint8 as the GGUF reader gives them, `k` weights a row) as
    int4 planes."""
    if type_name not in _TYPES:
        raise ValueError(f"{type_name} blocks do not map onto int4 planes (only {', '.join(PLANE_TYPES)} do)")
    weights, size, decode, chunk, multipliers = _TYPES[type_name]
    rows = data.shape[0]
    if k % weights or data.shape[1] != k // weights * size:
        raise ValueError(f"{type_name}: {data.shape[1]} bytes a row do not hold {k} weights")
    blocks = np.ascontiguousarray(data).reshape(rows, k // weights, size)
    values, scales, mins = decode(blocks)
    values = [v.reshape(rows, -1, chunk) for v in values]
    scales = [s.reshape(rows, -1) for s in scales]
    mins = [m.reshape(rows, -1) for m in mins]
    q, scale, group_min = _interleave(values, scales, mins, chunk)
    return Int4Planes(q.astype(np.uint8), scale.astype(np.float32), group_min.astype(np.float32), chunk,
                      multipliers)


@dataclass(frozen=True)
class AffineCodes:
    """One tensor's rows as integer codes with a scale and an optional offset per `group` weights,
    w = code * scale + zero: the form the GPU kernels read (`gllm.ops.quant_layout.QuantWeight`, whose kinds
    this follows). 4-bit types keep their 4-bit codes; Q5_x and Q8_0 take 8-bit codes with float scales (kind
    affine); Q4_K and Q6_K keep their own scales (kinds q4_k: 6-bit sub-scales sc and mins m under a float16
    d and dmin per 256, w = d sc q - dmin m, and q6_k: int8 sub-scales under a float16 d per 256, its codes
    0..63 offset by 32)."""
    codes: np.ndarray                   # [rows, k]: uint8 0..15 (bits 4), uint8 0..63 (bits 6) or int8 (bits 8)
    scale: np.ndarray                   # affine: float32 [rows, k / group]; q4_k: sc, uint8 [rows, k / 32];
                                        # q6_k: int8 [rows, k / 16]
    zero: np.ndarray | None             # affine: like scale, None: w = code * scale; q4_k: m, like sc; q6_k: None
    bits: int
    group: int
    kind: str = "affine"
    lead: np.ndarray | None = None      # float16; q4_k: [rows, k / 256 * 2] (d, dmin); q6_k: [rows, k / 256]

    def rows(self, index: np.ndarray) -> AffineCodes:
        return AffineCodes(self.codes[index], self.scale[index], None if self.zero is None else self.zero[index],
                           self.bits, self.group, self.kind, None if self.lead is None else self.lead[index])

    def weights(self) -> np.ndarray:
        """The float32 weights [rows, k] (the `gguf` package's dequantized ones, exactly)."""
        rows = self.codes.shape[0]
        if self.kind == "q4_k":
            lead = self.lead.astype(np.float32).reshape(rows, -1, 2)
            scale = lead[..., :1] * self.scale.reshape(rows, -1, 8)
            zero = -lead[..., 1:] * self.zero.reshape(rows, -1, 8)
        elif self.kind == "q6_k":
            scale = self.lead.astype(np.float32).repeat(16, 1) * self.scale.astype(np.float32)
            zero = -32.0 * scale
        else:
            scale, zero = self.scale, self.zero
        w = self.codes.astype(np.float32) * scale.reshape(rows, -1).repeat(self.group, 1)
        if zero is not None:
            w += zero.reshape(rows, -1).repeat(self.group, 1)
        return w


def _affine_q5(b: np.ndarray, at: int) -> np.ndarray:
    """Q5_0 / Q5_1: the 5-bit q of every weight, [rows, blocks, 32]."""
    low, high = _q5_bits(b, at)
    return low + 16 * high


def _affine(type_name: str, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """(codes [rows, blocks, ...], scale, zero or None, bits, group) of blocks `b` [rows, blocks, bytes]."""
    i8 = np.int8
    if type_name == "Q4_0":
        d = _f16(b, 0)
        return _nibbles(b[..., 2:18]), d, -8.0 * d, 4, 32
    if type_name == "Q4_1":
        return _nibbles(b[..., 4:20]), _f16(b, 0), _f16(b, 2), 4, 32
    if type_name == "Q5_0":
        return (_affine_q5(b, 2).astype(i8) - 16), _f16(b, 0), None, 8, 32
    if type_name == "Q5_1":
        return _affine_q5(b, 4).astype(i8), _f16(b, 0), _f16(b, 2), 8, 32
    if type_name == "Q5_K":
        scale, mn = _k_lead(b)
        return (_k_low(b[..., 48:176]) + 16 * _k5_high(b)).astype(i8), scale, mn, 8, 32
    if type_name == "Q8_0":
        return b[..., 2:34].view(i8), _f16(b, 0), None, 8, 32
    raise ValueError(f"{type_name} blocks have no affine codes (only {', '.join(PLANE_TYPES)} do)")


def affine_codes(type_name: str, data: np.ndarray, k: int) -> AffineCodes:
    """A tensor's rows (`data`: [rows, bytes] uint8 as the GGUF reader gives them, `k` weights a row) as affine
    codes. Exact: `AffineCodes.weights` is the `gguf` package's dequantized weight (the GPU layout then stores an
    affine kind's scale and zero in float16, which rounds Q5_K's d * sc products; Q4_K and Q6_K keep their
    own bytes)."""
    if type_name not in _TYPES:
        raise ValueError(f"{type_name} blocks have no affine codes (only {', '.join(PLANE_TYPES)} do)")
    weights, size = _TYPES[type_name][:2]
    rows = data.shape[0]
    if k % weights or data.shape[1] != k // weights * size:
        raise ValueError(f"{type_name}: {data.shape[1]} bytes a row do not hold {k} weights")
    blocks = np.ascontiguousarray(data).reshape(rows, k // weights, size)
    if type_name == "Q4_K":
        codes = np.ascontiguousarray(_k_low(blocks[..., 16:144])).reshape(rows, k)
        sc, mn = _k_scales(blocks[..., 4:16])
        lead = np.ascontiguousarray(blocks[..., 0:4]).view(np.float16).reshape(rows, -1)
        return AffineCodes(codes, sc.reshape(rows, -1), mn.reshape(rows, -1), 4, 32, "q4_k", lead)
    if type_name == "Q6_K":
        low, high, _ = _q6_k_parts(blocks)
        codes = np.ascontiguousarray(low + 16 * high).reshape(rows, k)
        sub = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).reshape(rows, -1)
        lead = np.ascontiguousarray(blocks[..., 208:210]).view(np.float16).reshape(rows, -1)
        return AffineCodes(codes, sub, None, 6, 16, "q6_k", lead)
    codes, scale, zero, bits, group = _affine(type_name, blocks)
    codes = np.ascontiguousarray(codes).reshape(rows, k).astype(np.uint8 if bits == 4 else np.int8)
    scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, k // group)
    zero = None if zero is None else np.ascontiguousarray(zero, dtype=np.float32).reshape(rows, k // group)
    return AffineCodes(codes, scale, zero, bits, group)

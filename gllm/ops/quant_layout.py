"""`QuantWeight`: a weight kept in 4 or 8 bits in the layout the GPU kernels read (`gllm.ops.triton_quant_gemv`),
with its reference dequantizer and a round-to-nearest quantizer. Plain torch: loaders and tests use it without
Triton.

A weight is w[n, k] = code[n, k] * scale[n, g] + zero[n, g], g = k // group: integer codes and, per group of
`group` consecutive K elements of an output row, a scale and (optionally) an offset. That one affine form holds
the formats a game ships: GGUF Q4_0 / Q8_0 (zero = -8 * scale / none), Q4_1 and Q4_K's sub-blocks (scale
d * sc, zero -dmin * m), Q5_x and Q6_K as 8-bit codes (`gllm.formats.gguf_quants.affine_codes`), gllm's own
int4/int8 quantization.

Layout (made by `QuantWeight.from_rows` once, at load): the codes as little-endian 32-bit words (8 four-bit
codes, element 8j + i in bits 4i..4i+3 of word j; or 4 int8 codes), and output rows interleaved in fours: word j
of rows 4a..4a+3 are one 16-byte vector, words[a, j, r]. A thread then loads four rows' codes for the same K
positions at once and multiplies them by the same x values: x is read from cache once for four weights instead
of once per weight, which was what bounded a row-major kernel (session 11, docs/benchmarks.md). Scales and
offsets are interleaved the same way; rows are padded to a multiple of four.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
        """Row-major codes ([N, K // 2] uint8 packed by `pack_nibbles` for 4 bits, [N, K] int8 for 8) and
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

    def row_slice(self, start: int, stop: int) -> QuantWeight:
        """Output rows start..stop as a weight of their own (views, no copy); `start` a multiple of the
        interleave (4), `stop` too or the last row."""
        stop = min(stop, self.out_features)
        if start % INTERLEAVE or (stop % INTERLEAVE and stop != self.out_features) or not 0 <= start < stop:
            raise ValueError(f"rows {start}..{stop} of {self.out_features} do not fall on quads of {INTERLEAVE}")
        quads = slice(start // INTERLEAVE, -(-stop // INTERLEAVE))
        return QuantWeight(self.words[quads], self.scale[quads], None if self.zero is None else self.zero[quads],
                           self.bits, self.group, self.in_features, stop - start)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Row-major [N, K // codes_per_word] words and [N, K // group] scales/offsets (the inverse of
        `from_rows`)."""
        def deinterleave(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(-1, t.shape[1])[:self.out_features]
        return (deinterleave(self.words), deinterleave(self.scale),
                None if self.zero is None else deinterleave(self.zero))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (any integer dtype) as [N, K // 2] uint8, element 2j low, 2j + 1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [N, K] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weights (the reference for the kernels, and the prefill path: dequantize once, then a dense
    matmul)."""
    words, scale, zero = w.rows()
    raw = words.contiguous().view(torch.uint8 if w.bits == 4 else torch.int8)
    codes = unpack_nibbles(raw) if w.bits == 4 else raw
    out = codes.float() * scale.float().repeat_interleave(w.group, dim=1)
    if zero is not None:
        out += zero.float().repeat_interleave(w.group, dim=1)
    return out.to(dtype)


def quantize(weight: torch.Tensor, bits: int, group: int, symmetric: bool | None = None) -> QuantWeight:
    """Round-to-nearest grouped quantization of a float [N, K] weight (for tests and benchmarks; the formats a
    file ships are repacked, not requantized; also gllm's int4/int8 on load). Four bits: asymmetric (scale and
    zero per group) unless asked; eight bits: symmetric."""
    n, k = weight.shape
    if k % group or group % 2:
        raise ValueError(f"in_features {k} must be a multiple of an even group size, got group {group}")
    symmetric = bits == 8 if symmetric is None else symmetric
    w = weight.float().view(n, k // group, group)
    tiny = 2.0 ** -24                      # float16's least positive value: a stored scale is never 0
    if symmetric:
        top = (1 << (bits - 1)) - 1
        scale = (w.abs().amax(dim=-1) / top).clamp_min(tiny)
        scale = scale.half().float()   # the codes are chosen against the scale as stored
        codes = torch.round(w / scale[..., None]).clamp(-top, top)
        zero = None
        if bits == 4:   # stored 0..15 with the offset in zero
            codes, zero = codes + 8, (-8 * scale).half()
    else:
        low = 0 if bits == 4 else -128    # four-bit codes are 0..15, eight-bit ones int8
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(tiny).half().float()
        zero = (lo - low * scale).half()
        codes = torch.round((w - zero.float()[..., None]) / scale[..., None]).clamp(low, low + (1 << bits) - 1)
    codes = codes.view(n, k)
    q = pack_nibbles(codes) if bits == 4 else codes.to(torch.int8)
    return QuantWeight.from_rows(q, scale.half(), zero, bits, group)

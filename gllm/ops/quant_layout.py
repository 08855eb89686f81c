"""`QuantWeight`: a weight kept in 4, 6 or 8 bits in the layout the GPU kernels read (`gllm.ops.triton_quant_gemv`),
with its reference dequantizer and round-to-nearest quantizers. Plain torch: loaders and tests use it without
Triton.

A weight is w[n, k] = code[n, k] * scale[n, g] + zero[n, g], g = k // group: integer codes and, per group of
`group` consecutive K elements of an output row, a scale and (optionally) an offset. How a group's scale and
offset are stored is the weight's `kind`:

    affine  float16 scale (and offset) per group. GGUF Q4_0 / Q8_0 (zero = -8 * scale / none), Q4_1, Q5_x
            as 8-bit codes (`gllm.formats.gguf_quants.affine_codes`), gllm's own int4/int8 quantization.
    q4_k    GGUF Q4_K: 4-bit codes, groups of 32, and per 256 weights float16 d and dmin (`lead`) and eight
            6-bit scales sc and mins m in 12 bytes: scale = d * sc, zero = -dmin * m. 4.5 bits a weight, as
            the file (the affine form of it took 5). The 12 bytes are packed for the kernels, not as the file
            packs them: byte j (j < 8) holds sc_j and m_j's low two bits (sc | m << 6), byte 8 + j // 2 the
            rest of m_j in nibble j % 2 — a group's pair takes two loads and six operations to unpack.
    q6_k    GGUF Q6_K: 6-bit codes u (w = (u - 32) * scale), groups of 16 with an int8 sub-scale sc each and a
            float16 d per 256: scale = d * sc, zero = -32 * scale. 6.5625 bits a weight (8-bit codes with
            float16 scales took 9).

Layout (made by `QuantWeight.from_rows` once, at load): the codes as little-endian 32-bit words (8 four-bit
codes, element 8j + i in bits 4i..4i+3 of word j; or 4 int8 codes), and output rows interleaved in fours: word j
of rows 4a..4a+3 are one 16-byte vector, words[a, j, r]. A thread then loads four rows' codes for the same K
positions at once and multiplies them by the same x values: x is read from cache once for four weights instead
of once per weight, which was what bounded a row-major kernel (session 11, docs/benchmarks.md). Scales, offsets
and the K-quants' packed scales and leads are interleaved the same way, the four rows' values side by side
innermost (a row quad's scales load as one vector); rows are padded to a multiple of four. Six-bit codes keep their low
four bits in the four-bit words and their top two bits in `high`, one word per 16 weights: for element
16a + 8t + 2b + c (t: which of the pair of low words, b: its byte, c: low or high nibble) in bits
8b + 4t + 2c of word a — so that `(high >> 4t) << 4` (and `<< 2`) puts a low word's even (odd) codes' top bits
beside their low nibbles, byte for byte, as the integer kernel's dot products take them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

INTERLEAVE = 4      # output rows sharing one 16-byte vector of codes
SUPER_BLOCK = 256   # weights a K-quant's lead scales and packed scales (q4_k) or lead scale (q6_k) cover
KINDS = ("affine", "q4_k", "q6_k")
_K_GROUP = {"q4_k": (4, 32), "q6_k": (6, 16)}   # kind -> (bits, group)


class QuantWeight(NamedTuple):
    words: torch.Tensor            # [ceil(N / 4), K // codes_per_word, 4] int32 (six bits: the low four)
    scale: torch.Tensor            # affine: [ceil(N / 4), K // group, 4] float16; q4_k: the packed scales,
                                   # [ceil(N / 4), K // 256, 12, 4] uint8; q6_k: [ceil(N / 4), K // 16, 4] int8
    zero: torch.Tensor | None      # affine: like scale, or None (w = code * scale); K-quants: None
    bits: int
    group: int
    in_features: int
    out_features: int
    kind: str = "affine"
    high: torch.Tensor | None = None   # six bits: the top two bits, [ceil(N / 4), K // 16, 4] int32
    lead: torch.Tensor | None = None   # q4_k: d and dmin, [ceil(N / 4), K // 256, 2, 4]; q6_k: d,
                                       # [ceil(N / 4), K // 256, 4]; float16

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    @property
    def has_offset(self) -> bool:
        """Whether the kernels add an offset per group (an affine zero, or a K-quant's)."""
        return self.zero is not None or self.kind != "affine"

    @property
    def packing(self) -> int:
        """The code width a row of x is packed for (`triton_quant_gemv.row_inputs`): six-bit codes are read as
        their four-bit words."""
        return 4 if self.bits == 6 else self.bits

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.words, self.scale, self.zero, self.high, self.lead)

    def _with(self, tensors: tuple[torch.Tensor | None, ...], out_features: int) -> QuantWeight:
        words, scale, zero, high, lead = tensors
        return QuantWeight(words, scale, zero, self.bits, self.group, self.in_features, out_features, self.kind,
                           high, lead)

    @staticmethod
    def from_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  group: int, kind: str = "affine", lead: torch.Tensor | None = None) -> QuantWeight:
        """Row-major codes ([N, K // 2] uint8 packed by `pack_nibbles` for 4 bits, [N, K] int8 for 8, [N, K]
        uint8 0..63 for 6) and per row: affine, [N, K // group] scales/offsets; q4_k, [N, K // 32] sc and m
        (`scale`, `zero`, 0..63) and `lead` [N, K // 256 * 2] (d, dmin); q6_k, [N, K // 16] int8 sub-scales
        and `lead` [N, K // 256] d — in the kernels' layout."""
        n = codes.shape[0]
        k = codes.shape[1] * (2 if bits == 4 else 1)
        per_word = 32 // (4 if bits == 6 else bits)
        if kind not in KINDS or (kind != "affine" and _K_GROUP[kind] != (bits, group)):
            raise ValueError(f"kind {kind!r} with {bits} bits in groups of {group} is not a layout "
                             f"({', '.join(KINDS)}; q4_k: 4 bits, 32; q6_k: 6 bits, 16)")
        if bits == 6 and kind == "affine":
            raise ValueError("six-bit codes come only as q6_k")
        if k % group or group % per_word or (kind != "affine" and k % SUPER_BLOCK):
            raise ValueError(f"in_features {k} must be a multiple of the group {group}, itself of {per_word}"
                             + (f", and of {SUPER_BLOCK} ({kind})" if kind != "affine" else ""))
        pad = -n % INTERLEAVE

        def interleave(t: torch.Tensor) -> torch.Tensor:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t
            return t.view(-1, INTERLEAVE, *t.shape[1:]).movedim(1, -1).contiguous()

        high = None
        if bits == 6:
            codes = codes.to(torch.uint8)
            high = interleave(pack_high_bits(codes >> 4))
            codes = pack_nibbles(codes & 0xF)
        words = interleave(codes.contiguous().view(torch.int32))
        if kind == "q4_k":
            scale, zero = pack_k_scales(scale.reshape(n, -1, 8), zero.reshape(n, -1, 8)), None
            lead = lead.reshape(n, k // SUPER_BLOCK, 2)
        elif kind == "affine":
            scale = scale.half()
        return QuantWeight(words, interleave(scale), None if zero is None else interleave(zero.half()), bits, group,
                           k, n, kind, high, None if lead is None else interleave(lead.half()))

    def row_slice(self, start: int, stop: int) -> QuantWeight:
        """Output rows start..stop as a weight of their own (views, no copy); `start` a multiple of the
        interleave (4), `stop` too or the last row."""
        stop = min(stop, self.out_features)
        if start % INTERLEAVE or (stop % INTERLEAVE and stop != self.out_features) or not 0 <= start < stop:
            raise ValueError(f"rows {start}..{stop} of {self.out_features} do not fall on quads of {INTERLEAVE}")
        quads = slice(start // INTERLEAVE, -(-stop // INTERLEAVE))
        return self._with(tuple(None if t is None else t[quads] for t in self._tensors()), stop - start)

    def rows(self) -> tuple[torch.Tensor, ...]:
        """Row-major words [N, K // codes_per_word] and the rest as `from_rows` takes them, each per row: scale,
        zero, high [N, K // 16] and lead (the inverse of `from_rows`, but for six-bit codes, whose words and
        high bits come apart)."""
        def deinterleave(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.movedim(-1, 1).reshape(-1, *t.shape[1:-1])[:self.out_features].flatten(1)
        return tuple(deinterleave(t) for t in self._tensors())


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (any integer dtype) as [N, K // 2] uint8, element 2j low, 2j + 1 high."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`: [N, K] uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# Bit of a 16-weight word holding element 16a + 8t + 2b + c's top two bits (module docstring).
_HIGH_SHIFTS = torch.tensor([8 * b + 4 * t + 2 * c for t in range(2) for b in range(4) for c in range(2)])


def pack_high_bits(top: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..3 (six-bit codes' top two bits) as [N, K // 16] int32 words, in the layout's order."""
    n, k = top.shape
    shifted = top.to(torch.int64).view(n, k // 16, 16) << _HIGH_SHIFTS.to(top.device)
    word = shifted.sum(-1)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_high_bits(words: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_high_bits`: [N, K] uint8 values 0..3."""
    n = words.shape[0]
    return ((words.to(torch.int64)[..., None] >> _HIGH_SHIFTS.to(words.device)) & 3).to(torch.uint8).view(n, -1)


def pack_k_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """q4_k: a super-block's eight sc and m [..., 8] (0..63) as the kernels' 12 bytes [..., 12] uint8."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    high = m >> 2
    return torch.cat([sc | ((m & 3) << 6), high[..., 0::2] | (high[..., 1::2] << 4)], dim=-1).to(torch.uint8)


def k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_k_scales`: sc, m [..., 8] (0..63) as float32."""
    p = packed.to(torch.int32)
    high = torch.stack([p[..., 8:] & 15, p[..., 8:] >> 4], dim=-1).flatten(-2)
    return (p[..., :8] & 63).float(), ((p[..., :8] >> 6) | (high << 2)).float()


def group_scales(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-major [N, K // group] float32 scales and offsets (None: none) of any kind."""
    _, scale, zero, _, lead = w.rows()
    if w.kind == "affine":
        return scale.float(), None if zero is None else zero.float()
    if w.kind == "q4_k":
        sc, m = k_scales(scale.view(w.out_features, -1, 12))
        d, dmin = lead.float().view(w.out_features, -1, 2).unbind(-1)
        return (d[..., None] * sc).flatten(1), (-dmin[..., None] * m).flatten(1)
    s = lead.float().repeat_interleave(SUPER_BLOCK // w.group, dim=1) * scale.float()
    return s, -32.0 * s


def codes_of(w: QuantWeight) -> torch.Tensor:
    """Row-major [N, K] integer codes (offset binary for 4 and 6 bits, int8 for 8)."""
    words, _, _, high, _ = w.rows()
    raw = words.contiguous().view(torch.uint8 if w.bits != 8 else torch.int8)
    if w.bits == 8:
        return raw
    codes = unpack_nibbles(raw)
    return codes if w.bits == 4 else codes | (unpack_high_bits(high) << 4)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] weights (the reference for the kernels, and the prefill path: dequantize once, then a dense
    matmul)."""
    scale, zero = group_scales(w)
    out = codes_of(w).float() * scale.repeat_interleave(w.group, dim=1)
    if zero is not None:
        out += zero.repeat_interleave(w.group, dim=1)
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


def quantize_k(weight: torch.Tensor, kind: str) -> QuantWeight:
    """Round-to-nearest quantization of a float [N, K] weight (K a multiple of 256) into a K-quant kind, min-max
    per group with the group scales rounded to the kind's 6 or 8 bits (a valid encoding; llama.cpp searches
    for better ones). For tests, benchmarks and Q4_K_M-style quantization on load."""
    n, k = weight.shape
    if kind not in _K_GROUP or k % SUPER_BLOCK:
        raise ValueError(f"quantize_k takes q4_k or q6_k and K a multiple of {SUPER_BLOCK}; got {kind!r}, {k}")
    tiny = 2.0 ** -24

    def lead_of(values: torch.Tensor, top: int) -> torch.Tensor:
        """Per super-block, the float16 multiplier of `values`' integer sub-scales (0..top in magnitude)."""
        return (values.abs().amax(-1) / top).clamp_min(tiny).half().float()

    if kind == "q4_k":
        w = weight.float().view(n, k // SUPER_BLOCK, 8, 32)
        lo = w.amin(-1).clamp_max(0.0)             # the offset is subtracted: a min of at most 0
        span = (w.amax(-1) - lo) / 15
        d, dmin = lead_of(span, 63), lead_of(-lo, 63)
        sc = torch.round(span / d[..., None]).clamp(0, 63)
        m = torch.round(-lo / dmin[..., None]).clamp(0, 63)
        scale, zero = d[..., None] * sc, -dmin[..., None] * m
        codes = torch.round((w - zero[..., None]) / scale.clamp_min(tiny)[..., None]).clamp(0, 15)
        sc, m = sc.to(torch.int32), m.to(torch.int32)
        return QuantWeight.from_rows(pack_nibbles(codes.view(n, k)), sc.view(n, -1), m.view(n, -1), 4, 32, "q4_k",
                                     lead=torch.stack([d, dmin], dim=-1).view(n, -1))
    w = weight.float().view(n, k // SUPER_BLOCK, 16, 16)
    sub = w.abs().amax(-1) / 31
    d = lead_of(sub, 127)
    sc = torch.round(sub / d[..., None]).clamp(-128, 127)
    scale = (d[..., None] * sc).clamp_min(tiny)
    codes = (torch.round(w / scale[..., None]) + 32).clamp(0, 63)
    return QuantWeight.from_rows(codes.view(n, k).to(torch.uint8), sc.to(torch.int8).view(n, -1), None, 6, 16,
                                 "q6_k", lead=d.half())

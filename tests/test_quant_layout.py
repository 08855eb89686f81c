"""The quantized-weight layout the GPU kernels read (gllm/ops/quant_layout.py): packing, interleaving, the
reference dequantizer and the quantizer. Plain torch, no GPU."""

from __future__ import annotations

import pytest
import torch

from gllm.ops import quant_layout as L


def test_quantize_round_trips_within_half_a_step():
    torch.manual_seed(1)
    weight = torch.randn(40, 64)
    for bits, symmetric in ((4, False), (4, True), (8, True)):
        w = L.quantize(weight, bits, 32, symmetric)
        step = w.rows()[1].float().repeat_interleave(32, dim=1)
        assert ((L.dequantize(w) - weight).abs() <= step / 2 + 1e-3 * step + 1e-6).all(), (bits, symmetric)
    codes = torch.arange(16).repeat(3, 2)
    assert torch.equal(L.unpack_nibbles(L.pack_nibbles(codes)), codes.byte())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernel_layout_interleaves_rows_in_fours_and_round_trips(bits):
    """Word j of rows 4a..4a+3 side by side; row counts not a multiple of four are padded with zeros."""
    torch.manual_seed(2)
    n, k = 6, 64
    codes = torch.randint(0, 16, (n, k)) if bits == 4 else torch.randint(-127, 128, (n, k))
    packed = L.pack_nibbles(codes) if bits == 4 else codes.to(torch.int8)
    scale, zero = torch.rand(n, 2).half(), torch.rand(n, 2).half()
    w = L.QuantWeight.from_rows(packed, scale, zero, bits, 32)
    assert w.words.shape == (2, k * bits // 32, 4) and w.scale.shape == (2, 2, 4) and w.out_features == n
    row_words = packed.contiguous().view(torch.int32)
    assert torch.equal(w.words[1, :, 1], row_words[5]) and not w.words[1, :, 2:].any()
    words, s, z, high, lead = w.rows()
    assert high is None and lead is None
    assert torch.equal(words, row_words) and torch.equal(s, scale) and torch.equal(z, zero)
    want = codes.float() * scale.float().repeat_interleave(32, 1) + zero.float().repeat_interleave(32, 1)
    assert torch.equal(L.dequantize(w), want)




@pytest.mark.parametrize("kind", ["q4_k", "q6_k"])
def test_k_quant_weights_keep_their_bits_and_the_quantizer_is_close(kind):
    """4.5 and 6.5625 bits a weight (rows padded to quads of 4), within about half a step of the float weight;
    row slices are those rows."""
    torch.manual_seed(0)
    w = torch.randn(40, 768) * 0.05
    q = L.quantize_k(w, kind)
    assert q.nbytes * 8 == {"q4_k": 4.5, "q6_k": 6.5625}[kind] * 40 * 768
    assert (q.bits, q.group, q.has_offset, q.packing) == {"q4_k": (4, 32, True, 4), "q6_k": (6, 16, True, 4)}[kind]
    step = {"q4_k": 15, "q6_k": 31}[kind]
    assert (L.dequantize(q) - w).abs().max() <= 1.1 * w.abs().max() / step
    full = L.dequantize(q)
    torch.testing.assert_close(L.dequantize(q.row_slice(4, 40)), full[4:], atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of 256"):
        L.quantize_k(torch.randn(4, 384), kind)


def test_six_bit_codes_keep_their_top_bits_where_the_integer_kernel_reads_them():
    """Element 16a + 8t + 2b + c's top two bits sit in bits 8b + 4t + 2c of word a: shifted right by 4t and
    left by 4 (even c) or 2 (odd c), they land in bits 4-5 of byte b, beside that code's low nibble."""
    torch.manual_seed(3)
    codes = torch.randint(0, 64, (5, 512), dtype=torch.uint8)
    scales = torch.randint(-128, 128, (5, 32), dtype=torch.int8)
    lead = torch.rand(5, 2).half()
    w = L.QuantWeight.from_rows(codes, scales, None, 6, 16, "q6_k", lead=lead)
    assert torch.equal(L.codes_of(w), codes)
    high = w.rows()[3]
    for e in (0, 1, 6, 9, 15, 16 + 8 + 5, 511):
        a, t, b, c = e // 16, (e // 8) % 2, (e % 8) // 2, e % 2
        assert (int(high[2, a]) >> (8 * b + 4 * t + 2 * c)) & 3 == int(codes[2, e]) >> 4
    want = (codes.float() - 32) * (lead.float().repeat_interleave(16, 1) * scales.float()).repeat_interleave(16, 1)
    torch.testing.assert_close(L.dequantize(w), want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="six-bit codes come only as q6_k"):
        L.QuantWeight.from_rows(codes, scales.half(), None, 6, 16)


def test_the_q4_k_m_mix_gives_six_bits_where_llama_cpp_does():
    """llama.cpp's Q4_K_M: v and down in Q6_K for the first and last eighth of the layers and every third one
    between (16 of an 8B model's 32), Q4_K elsewhere."""
    from gllm.model.quantized import k_mix, more_bits
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    w = torch.randn(96, 256) * 0.05
    parts, label = k_mix(w, "self_attn.qkv_proj", 0, 32, v_rows=16)
    assert label == "q4_k/q6_k" and [(p.kind, p.out_features) for p in parts] == [("q4_k", 80), ("q6_k", 16)]
    assert k_mix(w, "self_attn.qkv_proj", 4, 32, v_rows=16)[1] == "q4_k"
    assert k_mix(w, "mlp.down_proj", 31, 32)[1] == "q6_k" and k_mix(w, "mlp.gate_up_proj", 31, 32)[1] == "q4_k"

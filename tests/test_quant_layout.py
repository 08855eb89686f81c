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
    words, s, z = w.rows()
    assert torch.equal(words, row_words) and torch.equal(s, scale) and torch.equal(z, zero)
    want = codes.float() * scale.float().repeat_interleave(32, 1) + zero.float().repeat_interleave(32, 1)
    assert torch.equal(L.dequantize(w), want)



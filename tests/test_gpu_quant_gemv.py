"""The quantized decode GEMV kernel (gllm/ops/triton_quant_gemv.py) against its dequantized reference.

Skipped without CUDA. To run it on the Triton CPU interpreter instead (slow; small shapes only):
    TRITON_INTERPRET=1 GLLM_GEMV_TEST_DEVICE=cpu pytest tests/test_gpu_quant_gemv.py
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("GLLM_GEMV_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device: run on a GPU machine (or GLLM_GEMV_TEST_DEVICE=cpu "
                                       "with TRITON_INTERPRET=1)")

triton = pytest.importorskip("triton", reason="Triton is not installed")
from gllm.ops import triton_quant_gemv as Q  # noqa: E402

# (N, K): sizes no block divides, a K of several steps, and a K shorter than one step.
SHAPES = [(100, 96), (130, 640), (64, 32)]
# The interpreter has no bfloat16 arithmetic of its own (see tests/test_gpu_gemv.py): float16 stands in.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="interpreter bf16"))]


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (4, 32, True), (4, 16, False), (8, 32, True)])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quant_gemv_matches_the_dequantized_product(shape, dtype, rows, bits, group, symmetric):
    torch.manual_seed(0)
    n, k = shape
    w = Q.quantize(torch.randn(n, k) * 0.05, bits, group, symmetric)
    w = Q.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    want = (x.float() @ Q.dequantize(w).T).to(dtype)           # float32 products, rounded once
    got = Q.quant_gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_quantize_round_trips_within_half_a_step():
    torch.manual_seed(1)
    weight = torch.randn(40, 64)
    for bits, symmetric in ((4, False), (4, True), (8, True)):
        w = Q.quantize(weight, bits, 32, symmetric)
        step = w.rows()[1].float().repeat_interleave(32, dim=1)
        assert ((Q.dequantize(w) - weight).abs() <= step / 2 + 1e-3 * step + 1e-6).all(), (bits, symmetric)
    assert torch.equal(Q.unpack_int4(Q.pack_int4(torch.arange(16).repeat(3, 2))), torch.arange(16).repeat(3, 2).byte())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_kernel_layout_interleaves_rows_in_fours_and_round_trips(bits):
    """Word j of rows 4a..4a+3 side by side; row counts not a multiple of four are padded with zeros."""
    torch.manual_seed(2)
    n, k = 6, 64
    codes = torch.randint(0, 16, (n, k)) if bits == 4 else torch.randint(-127, 128, (n, k))
    packed = Q.pack_int4(codes) if bits == 4 else codes.to(torch.int8)
    scale, zero = torch.rand(n, 2).half(), torch.rand(n, 2).half()
    w = Q.QuantWeight.from_rows(packed, scale, zero, bits, 32)
    assert w.words.shape == (2, k * bits // 32, 4) and w.scale.shape == (2, 2, 4) and w.out_features == n
    row_words = packed.contiguous().view(torch.int32)
    assert torch.equal(w.words[1, :, 1], row_words[5]) and not w.words[1, :, 2:].any()
    words, s, z = w.rows()
    assert torch.equal(words, row_words) and torch.equal(s, scale) and torch.equal(z, zero)
    want = codes.float() * scale.float().repeat_interleave(32, 1) + zero.float().repeat_interleave(32, 1)
    assert torch.equal(Q.dequantize(w), want)


def test_quant_gemv_refuses_what_it_does_not_take():
    w = Q.quantize(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError):
        Q.quant_gemv(torch.randn(Q.MAX_ROWS + 1, 64), w)
    with pytest.raises(ValueError):
        Q.quant_gemv(torch.randn(1, 32), w)
    with pytest.raises(ValueError):
        Q.quantize(torch.randn(8, 48), 4, 32)

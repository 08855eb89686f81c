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
from gllm.ops import quant_layout as L  # noqa: E402
from gllm.ops import triton_quant_gemv as Q  # noqa: E402

# (N, K): sizes no block divides, a K of several steps, and a K shorter than one step.
SHAPES = [(100, 96), (130, 640), (64, 32)]
# The interpreter has no bfloat16 arithmetic of its own (see tests/test_gpu_gemv.py): float16 stands in.
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="interpreter bf16"))]


def int8_product(x: torch.Tensor, w: L.QuantWeight, block: int) -> torch.Tensor:
    """What the integer row kernel computes, in float64: x rounded to int8 per `block` (scale max|x| / 127,
    halves away from zero, as the kernel rounds it) times the dequantized weight."""
    k = x.shape[-1]
    xb = x.float().reshape(-1, k // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    v = xb * torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = (torch.trunc(v + torch.where(v >= 0, 0.5, -0.5)) * (amax / 127.0)).reshape(x.shape)
    return xq.double() @ L.dequantize(w).double().T


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (4, 32, True), (4, 16, False), (8, 32, True)])
@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quant_gemv_matches_the_dequantized_product(shape, dtype, rows, bits, group, symmetric):
    """Float32 products of the dequantized weight, rounded once; a 16-bit row goes through the integer kernel,
    whose product is that of x rounded to int8 per block (checked as closely), within 2 % of the largest
    output of x's own."""
    torch.manual_seed(0)
    n, k = shape
    w = L.quantize(torch.randn(n, k) * 0.05, bits, group, symmetric)
    w = L.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    want = (x.float() @ L.dequantize(w).T).to(dtype)           # float32 products, rounded once
    got = Q.quant_gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    block = Q.row_block(dtype, group) if rows == 1 else 0
    if block:
        torch.testing.assert_close(got.float(), int8_product(x, w, block).to(dtype).float(), atol=tol, rtol=tol)
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_quant_gemv_refuses_what_it_does_not_take():
    w = L.quantize(torch.randn(8, 64), 4, 32)
    with pytest.raises(ValueError):
        Q.quant_gemv(torch.randn(Q.MAX_ROWS + 1, 64), w)
    with pytest.raises(ValueError):
        Q.quant_gemv(torch.randn(1, 32), w)
    with pytest.raises(ValueError):
        L.quantize(torch.randn(8, 48), 4, 32)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (4, 16, True), (8, 32, True), (8, 16, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_dense_is_the_reference_dequantizer(bits, group, symmetric, dtype):
    torch.manual_seed(3)
    w = L.quantize(torch.randn(70, 192) * 0.05, bits, group, symmetric)
    w = L.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))
    got = Q.dequantize_dense(w, dtype)
    assert got.dtype == dtype and got.shape == (70, 192)
    torch.testing.assert_close(got.float(), L.dequantize(w).to(dtype).float(), atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 4])
def test_quant_gemv_writes_into_a_column_slice(rows):
    torch.manual_seed(4)
    parts = [L.quantize(torch.randn(n, 64) * 0.05, 4, 32) for n in (40, 24)]
    parts = [L.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w)) for w in parts]
    x = torch.randn(rows, 64, device=DEVICE)
    out = torch.full((rows, 64), float("nan"), device=DEVICE)
    Q.quant_gemv(x, parts[0], out=out[:, :40])
    Q.quant_gemv(x, parts[1], out=out[:, 40:])
    want = x @ torch.cat([L.dequantize(w) for w in parts]).T
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, group", [(4, 32), (8, 16)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue, residual", [("norm", False), ("silu", True), (None, True), (None, False)])
def test_one_row_with_its_prologue_and_the_residual_add(bits, group, dtype, prologue, residual):
    """The decode row path: `row_inputs` (RMSNorm, or SiLU·mul, then the permutation, or int8 blocks for 16-bit
    rows) and `quant_gemv_row` (the residual add folded in) give the unfused chain's values (each step rounded
    to the dtype as the model's kernels round it)."""
    torch.manual_seed(5)
    n, k, eps = 130, 640, 1e-5
    w = L.quantize(torch.randn(n, k) * 0.05, bits, group)
    w = L.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))
    x = torch.randn(1, 2 * k if prologue == "silu" else k, device=DEVICE).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    h = torch.randn(1, n, device=DEVICE).to(dtype)
    xin = x
    if prologue == "norm":
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        xin = (norm_weight.float() * normed.float()).to(dtype)
    elif prologue == "silu":
        gate, up = x.float().split(k, dim=-1)
        xin = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype)
    block = Q.row_block(dtype, group)             # 16-bit rows: x in int8 per block (see int8_product)
    want = (int8_product(xin, w, block) if block else xin.float() @ L.dequantize(w).T).to(dtype)
    if residual:
        want = (h.float() + want.float()).to(dtype)
    inputs = Q.row_inputs(x, bits, block=block, norm_weight=norm_weight if prologue == "norm" else None, eps=eps,
                          silu_mul=prologue == "silu")
    assert inputs.block == block and (inputs.values.dtype == torch.int32) == bool(block)
    target = h.clone()
    got = Q.quant_gemv_row(inputs, w, residual=target if residual else None, dtype=dtype)
    assert got.dtype == dtype and (got.data_ptr() == target.data_ptr()) == residual
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (8, 32, True), (4, 64, False)])
@pytest.mark.parametrize("config", [Q.QuantGemvConfig(1, 128, 1, 2), Q.QuantGemvConfig(2, 256, 2, 3), None])
def test_the_integer_row_kernel_over_several_tiles_of_k(bits, group, symmetric, config):
    """The integer row kernel loads the weight one tile of K ahead (the first before its dependent-launch
    wait): over 10, 5 or 1 tiles, and 1 or 2 row quads a program, it gives the product of x rounded to int8."""
    torch.manual_seed(1)
    n, k = 72, 1280
    w = _on_device(L.quantize(torch.randn(n, k) * 0.05, bits, group, symmetric))
    x = torch.randn(1, k, device=DEVICE).to(torch.float16)
    got = Q.quant_gemv_row(Q.row_inputs(x, bits, block=32), w, dtype=torch.float32, config=config)
    want = int8_product(x, w, 32)
    assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max()


def _on_device(w):
    return L.QuantWeight(*(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in w))


@pytest.mark.parametrize("bits, group, symmetric", [(4, 32, False), (8, 32, True), (8, 16, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_quantized_embedding_looks_up_the_dequantized_rows(bits, group, symmetric, dtype):
    """Rows of the reference dequantizer for every token, the token taken from the host or (run ahead) from the
    device's sampled ids, as `embed_tokens` does; rows 0..3 of a quad and the last, padded quad included."""
    from gllm.ops.triton_embedding import embed_quantized_tokens
    torch.manual_seed(5)
    w = _on_device(L.quantize(torch.randn(70, 96) * 0.05, bits, group, symmetric))
    table = L.dequantize(w).to(dtype)
    ids = torch.tensor([0, 1, 2, 3, 69, 68, 37, 4], device=DEVICE)
    got = embed_quantized_tokens(w, ids, dtype)
    assert got.dtype == dtype and got.shape == (8, 96)
    torch.testing.assert_close(got.float(), table[ids].float(), atol=0, rtol=0)
    source = torch.tensor([11, 66, 5], device=DEVICE)               # a previous step's sampled ids
    rows = torch.tensor([-1, 2, -1, 0, 1, -1, -1, -1], device=DEVICE)
    got = embed_quantized_tokens(w, ids, dtype, (rows, source))
    want = torch.tensor([0, 5, 2, 11, 66, 68, 37, 4], device=DEVICE)
    torch.testing.assert_close(got.float(), table[want].float(), atol=0, rtol=0)


def test_a_row_slice_is_those_rows_of_the_weight():
    w = L.quantize(torch.randn(70, 64) * 0.05, 4, 32)
    full = L.dequantize(w)
    for start, stop in ((0, 8), (4, 70), (64, 200), (12, 13 + 3)):
        torch.testing.assert_close(L.dequantize(w.row_slice(start, stop)), full[start:stop], atol=0, rtol=0)
    for start, stop in ((2, 8), (4, 6), (8, 8)):
        with pytest.raises(ValueError, match="quads"):
            w.row_slice(start, stop)


@pytest.mark.parametrize("dense_slice", [None, 64 * 24])
def test_a_wide_product_over_a_large_weight_is_taken_in_slices(monkeypatch, dense_slice):
    """Past the GEMV's rows a `GpuQuantizedLinear` dequantizes and multiplies; a weight over `DENSE_SLICE`
    weights (an 8B model's head) a slice of rows at a time, with the same result."""
    from gllm.model.quantized import GpuQuantizedLinear
    torch.manual_seed(6)
    parts = [_on_device(L.quantize(torch.randn(n, 64) * 0.05, bits, 32)) for n, bits in ((70, 4), (42, 8))]
    linear = GpuQuantizedLinear(parts, "int4/int8")
    if dense_slice is not None:
        monkeypatch.setattr(GpuQuantizedLinear, "DENSE_SLICE", dense_slice)   # 24 rows a slice
    x = torch.randn(Q.MAX_ROWS + 4, 64, device=DEVICE)
    want = x @ torch.cat([L.dequantize(w) for w in parts]).T
    torch.testing.assert_close(linear(x), want, atol=1e-4, rtol=1e-4)


# The K-quant kinds: GGUF Q4_K and Q6_K kept in their own scales (two levels: a 6- or 8-bit scale per group
# under a float16 one per 256 weights) and, for Q6_K, six-bit codes. Rows of K = 512 and 768 (whole 256-weight
# super-blocks; 768: three, so a tile of K is not a power of two of them).
K_KINDS = ["q4_k", "q6_k"]


def _k_weight(kind: str, n: int, k: int, seed: int) -> L.QuantWeight:
    torch.manual_seed(seed)
    return _on_device(L.quantize_k(torch.randn(n, k) * 0.05, kind))


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(100, 512), (36, 768)])
def test_k_quant_gemv_matches_the_dequantized_product(shape, dtype, rows, kind):
    n, k = shape
    w = _k_weight(kind, n, k, seed=rows)
    x = torch.randn(rows, k, device=DEVICE).to(dtype)
    got = Q.quant_gemv(x, w)
    assert got.dtype == dtype and got.shape == (rows, n)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    block = Q.row_block(dtype, w.group) if rows == 1 else 0
    want = int8_product(x, w, block) if block else x.float() @ L.dequantize(w).T
    torch.testing.assert_close(got.float(), want.to(dtype).float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_quant_dequantize_dense_and_the_embedding_are_the_reference(kind, dtype):
    from gllm.ops.triton_embedding import embed_quantized_tokens
    w = _k_weight(kind, 70, 512, seed=3)
    table = L.dequantize(w).to(dtype)
    torch.testing.assert_close(Q.dequantize_dense(w, dtype).float(), table.float(), atol=0, rtol=0)
    ids = torch.tensor([0, 1, 2, 3, 69, 68, 37, 4], device=DEVICE)
    torch.testing.assert_close(embed_quantized_tokens(w, ids, dtype).float(), table[ids].float(), atol=0, rtol=0)


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prologue, residual", [("norm", False), ("silu", True)])
def test_k_quant_row_with_its_prologue_and_the_residual_add(kind, dtype, prologue, residual):
    """As test_one_row_with_its_prologue_and_the_residual_add, for the K-quant kinds."""
    n, k, eps = 130, 512, 1e-5
    w = _k_weight(kind, n, k, seed=5)
    x = torch.randn(1, 2 * k if prologue == "silu" else k, device=DEVICE).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(dtype)
    h = torch.randn(1, n, device=DEVICE).to(dtype)
    if prologue == "norm":
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        xin = (norm_weight.float() * normed.float()).to(dtype)
    else:
        gate, up = x.float().split(k, dim=-1)
        xin = (torch.nn.functional.silu(gate).to(dtype).float() * up).to(dtype)
    block = Q.row_block(dtype, w.group)
    want = (int8_product(xin, w, block) if block else xin.float() @ L.dequantize(w).T).to(dtype)
    if residual:
        want = (h.float() + want.float()).to(dtype)
    inputs = Q.row_inputs(x, w.packing, block=block, norm_weight=norm_weight if prologue == "norm" else None,
                          eps=eps, silu_mul=prologue == "silu")
    target = h.clone()
    got = Q.quant_gemv_row(inputs, w, residual=target if residual else None, dtype=dtype)
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    if kind == "q6_k" and block:
        with pytest.raises(ValueError, match="six bits: 16"):
            Q.quant_gemv_row(Q.row_inputs(xin, 4, block=8), w, dtype=dtype)


@pytest.mark.parametrize("kind", K_KINDS)
@pytest.mark.parametrize("config", [Q.QuantGemvConfig(1, 256, 1, 2), Q.QuantGemvConfig(2, 512, 2, 3), None])
def test_the_integer_row_kernel_over_several_tiles_of_k_quants(kind, config):
    w = _k_weight(kind, 72, 1280, seed=1)
    x = torch.randn(1, 1280, device=DEVICE).to(torch.float16)
    block = Q.row_block(torch.float16, w.group)
    got = Q.quant_gemv_row(Q.row_inputs(x, w.packing, block=block), w, dtype=torch.float32, config=config)
    want = int8_product(x, w, block)
    assert (got.double() - want).abs().max() <= 1e-3 * want.abs().max()


def test_a_projection_of_mixed_kinds_runs_each_part_in_its_own():
    """A Q4_K_M file's q/k/v: q and k in Q4_K, v in Q6_K — one decode row, a few rows and a wide product."""
    from gllm.model.quantized import GpuQuantizedLinear
    parts = [_k_weight("q4_k", 64, 512, seed=7), _k_weight("q4_k", 16, 512, seed=8), _k_weight("q6_k", 16, 512, 9)]
    linear = GpuQuantizedLinear(parts, "Q4_K/Q6_K")
    weight = torch.cat([L.dequantize(w) for w in parts])
    for rows in (1, 3, Q.MAX_ROWS + 4):
        x = torch.randn(rows, 512, device=DEVICE)
        torch.testing.assert_close(linear(x), x @ weight.T, atol=1e-4, rtol=1e-4)
    x = torch.randn(1, 512, device=DEVICE)
    torch.testing.assert_close(linear.row(x), x @ weight.T, atol=1e-4, rtol=1e-4)

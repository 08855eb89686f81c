"""GGUF blocks as int4 planes (gllm.formats.gguf_quants): for every type, random valid blocks read as planes give
exactly the `gguf` package's own dequantized weights, and the int4 kernel fed those planes (activations widened)
computes the product with them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES

from gllm.formats.gguf_quants import GROUP, PLANE_TYPES, affine_codes, int4_planes
from gllm.model.quantized import planes_weight
from gllm.ops.quant import WIDE_ROWS, StackedWeight, dequantize_t, quant_matmul
from gllm.ops.quant_layout import dequantize

# where each block stores its float16 scale(s): random bytes there could be inf or NaN
SCALE_BYTES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in the type's block layout with finite, modest float16 scales: a valid encoding."""
    rng = np.random.default_rng(seed)
    weights, size = GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)]
    data = rng.integers(0, 256, (rows, k // weights * size), dtype=np.uint8)
    blocks = data.reshape(rows, k // weights, size)
    for at in SCALE_BYTES[type_name]:
        scales = rng.uniform(-0.01, 0.01, (rows, k // weights)).astype(np.float16)
        blocks[..., at:at + 2] = scales[..., None].view(np.uint8)
    return data


def reference(type_name: str, data: np.ndarray, k: int) -> np.ndarray:
    return gguf.quants.dequantize(data, getattr(gguf.GGMLQuantizationType, type_name)).reshape(-1, k)


def from_planes(p) -> np.ndarray:
    """The planes' arithmetic written out: sum over planes of multiplier x (group_min + scale q)."""
    rows, planes = p.q.shape[0], len(p.multipliers)
    w = p.group_min.repeat(GROUP, 1) + p.scale.repeat(GROUP, 1) * p.q
    w = w.reshape(rows, -1, planes, p.chunk) * np.asarray(p.multipliers, np.float32).reshape(1, 1, planes, 1)
    return w.sum(2).reshape(rows, -1)


@pytest.mark.parametrize("type_name", PLANE_TYPES)
def test_planes_are_the_gguf_dequantizer_exactly(type_name):
    data = random_blocks(type_name, 16, 512)
    planes = int4_planes(type_name, data, 512)
    assert planes.q.dtype == np.uint8 and planes.q.max() <= 15
    assert np.array_equal(from_planes(planes), reference(type_name, data, 512))


@pytest.mark.parametrize("rows", [5, WIDE_ROWS])          # the int4 kernel; dequantized + one float32 GEMM
@pytest.mark.parametrize("type_name", PLANE_TYPES)
def test_the_int4_kernel_computes_with_the_planes(type_name, rows):
    """float32 products: the file's weights within float32 rounding; bfloat16: within bfloat16 rounding of the
    activations and scales (a stated 2 % of the largest output)."""
    k = 512
    data = random_blocks(type_name, 32, k, seed=1)
    w = torch.from_numpy(reference(type_name, data, k))
    x = torch.randn(rows, k)
    want = x @ w.T
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.02)):
        qw = planes_weight([int4_planes(type_name, data, k)], dtype)
        assert qw.shape == (32, k)
        y = quant_matmul(x.to(dtype), qw).float()
        assert (y - want).abs().max() <= tol * want.abs().max(), (dtype, (y - want).abs().max())


def test_parts_in_different_layouts_are_stacked_in_row_order():
    """A fused projection stored as Q4_K, Q4_K and Q6_K parts (q, k, v of a Q4_K_M file): q and k share one
    product, v takes another; rows come out in the parts' order."""
    k = 256
    parts = [("Q4_K", 16), ("Q4_K", 16), ("Q6_K", 16)]
    datas = [random_blocks(t, rows, k, seed=i) for i, (t, rows) in enumerate(parts)]
    qw = planes_weight([int4_planes(t, d, k) for (t, _), d in zip(parts, datas)], torch.float32)
    assert isinstance(qw, StackedWeight) and [p.shape[0] for p in qw.parts] == [32, 16]
    w = torch.from_numpy(np.concatenate([reference(t, d, k) for (t, _), d in zip(parts, datas)]))
    x = torch.randn(3, k)
    assert torch.allclose(quant_matmul(x, qw), x @ w.T, rtol=0, atol=1e-5 * (x @ w.T).abs().max().item())


@pytest.mark.parametrize("type_name", ["Q8_0", "Q6_K"])
def test_a_head_decoded_and_packed_in_row_blocks_is_the_whole(type_name):
    """A large head is decoded and packed 64 rows at a time here (4,096 in the loader): the same bytes and
    scales as the whole at once, and 160 rows (two blocks and a tail of 32) compute the file's product."""
    from gllm.model.quantized import planes_weight_in_blocks
    k = 256
    data = random_blocks(type_name, 160, k, seed=4)
    whole = planes_weight([int4_planes(type_name, data, k)], torch.float32)
    blocks = planes_weight_in_blocks((int4_planes(type_name, data[a:a + 64], k) for a in range(0, 160, 64)),
                                     torch.float32)
    assert (blocks.n, blocks.k, blocks.planes) == (whole.n, whole.k, whole.planes) == (160, k, 2)
    assert torch.equal(blocks.packed, whole.packed) and torch.equal(blocks.scales_and_zeros, whole.scales_and_zeros)
    w = torch.from_numpy(reference(type_name, data, k))
    x = torch.randn(3, k)
    assert torch.allclose(quant_matmul(x, blocks), x @ w.T, rtol=0, atol=1e-5 * (x @ w.T).abs().max().item())
    with pytest.raises(ValueError, match="whole row blocks"):
        planes_weight_in_blocks((int4_planes(type_name, data[a:a + 48], k) for a in range(0, 160, 48)),
                                torch.float32)


@pytest.mark.parametrize("type_name", ["Q6_K", "Q4_K", "Q8_0"])
def test_an_embedding_decoded_in_row_blocks_is_the_whole_in_the_gpu_layout(type_name):
    """A GPU embedding table or head is decoded and moved 4,096 rows at a time (64 here) into one weight: the
    same words, scales and offsets as the whole decoded at once (the layout on the CPU, as the kernels take it);
    150 rows end on a block of 22 (not whole quads: only the last block may)."""
    from gllm.model.quantized import affine_weight, affine_weight_in_blocks
    k = 256
    data = random_blocks(type_name, 150, k, seed=6)
    cpu = torch.device("cpu")
    whole = affine_weight([affine_codes(type_name, data, k)], cpu)[0]
    blocks = affine_weight_in_blocks((affine_codes(type_name, data[a:a + 64], k) for a in range(0, 150, 64)), 150,
                                     cpu)
    assert (blocks.bits, blocks.group, blocks.in_features, blocks.out_features) == \
        (whole.bits, whole.group, whole.in_features, whole.out_features) == (whole.bits, whole.group, k, 150)
    assert torch.equal(blocks.words, whole.words) and torch.equal(blocks.scale, whole.scale)
    assert (blocks.zero is None) == (whole.zero is None)
    assert whole.zero is None or torch.equal(blocks.zero, whole.zero)
    want = reference(type_name, data, k)
    assert np.allclose(dequantize(blocks).numpy(), want, rtol=0, atol=2 ** -10 * np.abs(want).max())
    with pytest.raises(ValueError, match="do not stack"):
        affine_weight_in_blocks((affine_codes(type_name, data[a:a + 30], k) for a in range(0, 150, 30)), 150, cpu)
    with pytest.raises(ValueError, match="hold 128 rows, not 150"):
        affine_weight_in_blocks((affine_codes(type_name, data[a:a + 64], k) for a in range(0, 128, 64)), 150, cpu)


def test_types_and_rows_the_planes_cannot_take_are_clear_errors():
    with pytest.raises(ValueError, match="do not map onto int4 planes"):
        int4_planes("Q2_K", np.zeros((2, 84), np.uint8), 256)
    with pytest.raises(ValueError, match="do not hold 64 weights"):
        int4_planes("Q4_1", np.zeros((2, 20), np.uint8), 64)
    with pytest.raises(ValueError, match="do not hold 512 weights"):
        int4_planes("Q6_K", np.zeros((2, 210), np.uint8), 512)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K"])
def test_wide_products_dequantize_block_by_block(type_name, monkeypatch):
    """The wide path reads torch's packed layout right for any block of output rows (blocks of 64 here), and a
    weight whose rows are not whole blocks of 32 keeps the kernel."""
    import gllm.ops.quant as quant
    monkeypatch.setattr(quant, "_WIDE_BLOCK", 64)
    k = 256
    data = random_blocks(type_name, 160, k, seed=3)
    qw = planes_weight([int4_planes(type_name, data, k)], torch.float32)
    w = torch.from_numpy(reference(type_name, data, k))
    assert torch.allclose(dequantize_t(qw), w.T, rtol=0, atol=1e-6 * w.abs().max().item())
    x = torch.randn(WIDE_ROWS, k)
    assert torch.allclose(quant_matmul(x, qw), x @ w.T, rtol=0, atol=1e-5 * (x @ w.T).abs().max().item())
    odd = planes_weight([int4_planes(type_name, random_blocks(type_name, 48, k), k)], torch.float32)
    w48 = torch.from_numpy(reference(type_name, random_blocks(type_name, 48, k), k))
    assert torch.allclose(quant_matmul(x, odd), x @ w48.T, rtol=0, atol=1e-5 * (x @ w48.T).abs().max().item())


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_the_wide_path_reads_torchs_int4_packing_on_every_instruction_set(capability):
    """torch packs int4 weights differently for the kernels it dispatches to (blocks of 32 rows on AVX2, 64 on
    AVX-512, adjacent pairs without vector kernels): a process forced to each (`ATEN_CPU_CAPABILITY`; a CPU
    without it gets the best it has) finds its layout, and a wide product (dequantized, one float32 GEMM) is
    the kernel's product, for 160 rows (AVX-512: two blocks of 64 and one of 32). Packed a block of rows at a
    time (as large weights are), or as pieces stacked afterwards (a GGUF head), the bytes are the whole's."""
    import json
    import os
    import subprocess
    import sys
    code = (
        "import json, torch\n"
        "from gllm.ops.quant import WIDE_ROWS, packing_layout, quant_matmul, quantize_int4\n"
        "torch.manual_seed(0)\n"
        "q = quantize_int4(torch.randn(160, 256), 32, torch.float32)\n"
        "x = torch.randn(WIDE_ROWS, 256)\n"
        "kernel = torch._weight_int4pack_mm_for_cpu(x, q.packed, 32, q.scales_and_zeros)\n"
        "import gllm.ops.quant as Q\n"
        "codes = torch.randint(0, 16, (160, 256), dtype=torch.int32)\n"
        "scale, low = torch.rand(160, 8) + 0.1, torch.randn(160, 8)\n"
        "whole = Q.pack_int4(codes, scale, low, 32, torch.float32)\n"
        "Q._PACK_ROWS = 64\n"
        "blockwise = Q.pack_int4(codes.to(torch.uint8), scale, low, 32, torch.float32)\n"
        "stacked = Q.concat_int4([Q.pack_int4(codes[a:b], scale[a:b], low[a:b], 32, torch.float32)\n"
        "                         for a, b in ((0, 64), (64, 128), (128, 160))])\n"
        "same = all(torch.equal(w.packed, whole.packed) and torch.equal(w.scales_and_zeros, whole.scales_and_zeros)\n"
        "           and w.n == 160 for w in (blockwise, stacked))\n"
        "print(json.dumps([torch.backends.cpu.get_cpu_capability(), packing_layout(160, 256),\n"
        "                  ((quant_matmul(x, q) - kernel).abs().max() / kernel.abs().max()).item(), same]))\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reported, layout, error, same_bytes = json.loads(out.stdout.strip().splitlines()[-1])
    assert layout == {"DEFAULT": "pairs", "AVX2": "avx2", "AVX512": "avx512"}.get(reported, layout), reported
    assert layout is not None and error < 1e-5, (reported, layout, error)
    assert same_bytes, reported


@pytest.mark.parametrize("type_name", PLANE_TYPES)
def test_affine_codes_are_the_gguf_dequantizer_exactly(type_name):
    """The codes with their scales (and offsets) are gguf's dequantized weight; in the GPU layout too, within
    float16 rounding of an affine kind's scales — Q4_K and Q6_K keep their own bytes there (4.5 and 6.5625
    bits a weight) and stay exact."""
    from gllm.model.quantized import affine_weight
    k = 512
    data = random_blocks(type_name, 12, k, seed=5)
    a = affine_codes(type_name, data, k)
    assert a.codes.shape == (12, k)
    assert a.kind == {"Q4_K": "q4_k", "Q6_K": "q6_k"}.get(type_name, "affine")
    assert a.codes.dtype == (np.int8 if a.bits == 8 else np.uint8)
    want = reference(type_name, data, k)
    assert np.allclose(a.weights(), want, rtol=0, atol=1e-6 * np.abs(want).max())
    qw = affine_weight([a], torch.device("cpu"))[0]
    exact = a.kind != "affine" or type_name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
    atol = 0 if exact else 2 ** -10 * np.abs(want).max()
    assert np.allclose(dequantize(qw).numpy(), want, rtol=0, atol=atol)
    if a.kind != "affine":
        assert qw.nbytes * 8 == {"q4_k": 4.5, "q6_k": 6.5625}[a.kind] * 12 * k
    rows = a.rows(np.array([3, 0]))
    assert np.array_equal(rows.codes, a.codes[[3, 0]]) and np.array_equal(rows.scale, a.scale[[3, 0]])

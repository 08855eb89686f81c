"""The decode GEMV kernel (gllm/ops/triton_gemv.py) against the unfused chain it replaces.

Skipped without CUDA. To run it on the Triton CPU interpreter instead (slow; small shapes only):
    TRITON_INTERPRET=1 GLLM_GEMV_TEST_DEVICE=cpu pytest tests/test_gpu_gemv.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = os.environ.get("GLLM_GEMV_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device: run on a GPU machine (or GLLM_GEMV_TEST_DEVICE=cpu "
                                       "with TRITON_INTERPRET=1)")

triton = pytest.importorskip("triton", reason="Triton is not installed")
import gllm.model  # noqa: E402,F401  (gllm.ops cannot be the first gllm package imported: import cycle)
from gllm.ops import triton_fused, triton_gemv  # noqa: E402

ROWS = [1, 2, 3, 8, 16]
# (N, K): odd sizes that no block divides, tiny-model sizes, and one wide enough for several K steps.
SHAPES = [(1000, 520), (256, 64), (130, 200), (512, 1024)]
OPTIONS = ["plain", "norm", "residual", "silu", "norm_silu", "logits", "norm_logits"]
EPS = 1e-5
# The interpreter truncates float32 -> bfloat16 and runs a bfloat16 tl.dot on the raw bits, so there
# bfloat16 is left to the GPU and float16 (same rounding steps, numpy-native) stands in for it.
DTYPES = [torch.float32,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE != "cuda", reason="interpreter bf16")),
          torch.float16]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # x as a view with a padded row stride, as a slice of a larger buffer would be
    x = (torch.randn(m, k + 8, generator=gen) * 3).to(dtype)[:, :k].to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype).to(DEVICE)
    residual = torch.randn(m, n, generator=gen).to(dtype).to(DEVICE)
    return x, w, norm_w, residual


def kwargs_for(option: str, norm_w: torch.Tensor, residual: torch.Tensor) -> dict:
    kw: dict = {}
    if "norm" in option:
        kw.update(norm_weight=norm_w, eps=EPS)
    if option == "residual":
        kw["residual"] = residual.clone()
    if "silu" in option:
        kw["silu_mul"] = True
    if "logits" in option:
        kw["out_dtype"] = torch.float32
    return kw


def unfused(option: str, x, w, norm_w, residual) -> torch.Tensor:
    """The chain the kernel replaces, in the tensors' own dtype (existing fused kernels where they exist)."""
    if "norm" in option:
        x = triton_fused.rms_norm(x.contiguous(), norm_w, EPS)
    y = F.linear(x, w)
    if "silu" in option:
        gate, up = y.split(w.shape[0] // 2, dim=-1)
        y = F.silu(gate) * up
    if option == "residual":
        y = y + residual
    return y.float() if "logits" in option else y


def reference(option: str, x, w, norm_w, residual) -> torch.Tensor:
    """The same function in float64 with no intermediate rounding."""
    x, w, norm_w, residual = (t.double() for t in (x, w, norm_w, residual))
    if "norm" in option:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * norm_w
    y = x @ w.T
    if "silu" in option:
        gate, up = y.split(w.shape[0] // 2, dim=-1)
        y = F.silu(gate) * up
    if option == "residual":
        y = y + residual
    return y


def assert_near(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Elementwise within a few roundings of the dtype (relative to the element and to the output's
    RMS, for sums that cancel), and within one rounding overall."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).all(), what
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}.get(dtype, 3e-2)   # bf16: 8 bits, rounded up to 5 times
    scale = ref.pow(2).mean().sqrt().item()
    err = (got - ref).abs()
    worst = (err - tol * ref.abs()).max().item()
    assert worst <= tol * scale, f"{what}: max abs err {err.max().item():.3g}, scale {scale:.3g}"
    overall = (err.norm() / ref.norm()).item()
    assert overall < tol / 4, f"{what}: relative error {overall:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("option", OPTIONS)
def test_gemv_matches_unfused_chain(option, n, k, m, dtype):
    x, w, norm_w, residual = make_inputs(m, n, k, dtype, seed=n * 131 + k * 7 + m)
    kw = kwargs_for(option, norm_w, residual)
    got = triton_gemv.linear(x, w, **kw)
    out_n = n // 2 if "silu" in option else n
    assert got.shape == (m, out_n)
    assert got.dtype == (torch.float32 if "logits" in option else dtype)
    if option == "residual":
        assert got is kw["residual"]
    assert_near(got, reference(option, x, w, norm_w, residual), dtype, "vs float64 reference")
    assert_near(got, unfused(option, x, w, norm_w, residual).double(), dtype, "vs unfused chain")
    if dtype != torch.float32:   # no atomics, no split-K: the same bits every time
        again = triton_gemv.linear(x, w, **kwargs_for(option, norm_w, residual))
        assert torch.equal(got, again), "not bitwise reproducible"


@pytest.mark.parametrize("m,config", [
    (1, triton_gemv.GemvConfig(1, 256, 4, 1)), (1, triton_gemv.GemvConfig(16, 64, 8, 3)),
    (2, triton_gemv.GemvConfig(8, 128, 4, 2)), (4, triton_gemv.GemvConfig(2, 1024, 8, 1)),
    (3, triton_gemv.GemvConfig(16, 64, 4, 2, dot=True)), (16, triton_gemv.GemvConfig(32, 256, 8, 4, dot=True))])
def test_gemv_explicit_configs(m, config):
    """Launch shapes other than the defaults (bench_gemv --sweep times them) compute the same thing."""
    for option in ("plain", "norm_silu", "residual"):
        x, w, norm_w, residual = make_inputs(m, 1000, 520, torch.float16, seed=m)
        got = triton_gemv.linear(x, w, config=config, **kwargs_for(option, norm_w, residual))
        assert_near(got, reference(option, x, w, norm_w, residual), torch.float16, f"{option} {config}")


def test_gemv_edges():
    x, w, _, _ = make_inputs(1, 64, 64, torch.bfloat16, seed=0)
    assert triton_gemv.linear(x[:0], w).shape == (0, 64)
    too_many = torch.zeros(triton_gemv.MAX_ROWS + 1, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError):
        triton_gemv.linear(too_many, w)
    with pytest.raises(ValueError):
        triton_gemv.linear(x, w[:, :32])
    square = torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError):   # x read whole by every program while they write the residual
        triton_gemv.linear(square, w, residual=square)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_gemv_captures_in_cuda_graph():
    """A 1B-shaped layer chain of the four fused calls, captured once and replayed on new inputs."""
    torch.manual_seed(0)
    hidden, inter, qkv, dtype = 256, 512, 384, torch.bfloat16
    w_qkv = torch.randn(qkv, hidden, device="cuda", dtype=dtype) / hidden ** 0.5
    w_o = torch.randn(hidden, qkv, device="cuda", dtype=dtype) / qkv ** 0.5
    w_gu = torch.randn(2 * inter, hidden, device="cuda", dtype=dtype) / hidden ** 0.5
    w_down = torch.randn(hidden, inter, device="cuda", dtype=dtype) / inter ** 0.5
    n1, n2 = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(dtype), torch.ones(hidden, device="cuda", dtype=dtype)
    residual = torch.empty(4, hidden, device="cuda", dtype=dtype)

    def chain():
        a = triton_gemv.linear(residual, w_qkv, norm_weight=n1, eps=EPS)
        triton_gemv.linear(a, w_o, residual=residual)
        h = triton_gemv.linear(residual, w_gu, norm_weight=n2, eps=EPS, silu_mul=True)
        triton_gemv.linear(h, w_down, residual=residual)
        return triton_gemv.linear(residual, w_qkv, out_dtype=torch.float32)

    start = torch.randn(4, hidden, device="cuda", dtype=dtype)
    residual.copy_(start)
    expected = chain().clone()
    expected_residual = residual.clone()

    graph = torch.cuda.CUDAGraph()
    residual.copy_(start)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        logits = chain()
    for _ in range(2):
        residual.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(logits, expected)
        assert torch.equal(residual, expected_residual)
    residual.copy_(torch.randn_like(start))
    graph.replay()
    assert not torch.equal(logits, expected)

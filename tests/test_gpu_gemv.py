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


def rope_tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.arange(positions).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("heads", [(4, 2, 16), (8, 2, 64), (3, 1, 32)], ids=["4q2kv16", "8q2kv64", "3q1kv32"])
def test_gemv_rope_epilogue(heads, m, dtype):
    """The q/k/v projection with RoPE and the cache writes in its epilogue, against the unfused chain
    (projection, then triton_fused.rope_and_write_kv) and a float64 reference."""
    num_q, num_kv, head_dim = heads
    k_dim = 200
    n = (num_q + 2 * num_kv) * head_dim
    x, w, norm_w, _ = make_inputs(m, n, k_dim, dtype, seed=n + m)
    gen = torch.Generator().manual_seed(m)
    cos, sin = rope_tables(64, head_dim)
    positions = torch.randint(0, 64, (m,), generator=gen).to(DEVICE)
    slots = torch.randperm(40, generator=gen)[:m].to(DEVICE)
    sentinel = torch.full((40, num_kv, head_dim), 7.0, dtype=dtype, device=DEVICE)
    k_cache, v_cache = sentinel.clone(), sentinel.clone()
    rope = triton_gemv.RopeKV(cos, sin, positions, slots, k_cache, v_cache, num_q, num_kv, head_dim)
    q = triton_gemv.linear(x, w, norm_weight=norm_w, eps=EPS, rope=rope)
    assert q.shape == (m, num_q * head_dim) and q.dtype == dtype

    y = reference("norm", x, w, norm_w, norm_w)
    rq, rk, rv = y.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    c, s = cos[positions][:, None].double(), sin[positions][:, None].double()
    rq = rotate(rq.reshape(m, num_q, head_dim), c, s)
    rk = rotate(rk.reshape(m, num_kv, head_dim), c, s)
    assert_near(q.view(m, num_q, head_dim), rq, dtype, "q vs float64 reference")
    assert_near(k_cache[slots], rk, dtype, "k vs float64 reference")
    assert_near(v_cache[slots], rv.reshape(m, num_kv, head_dim), dtype, "v vs float64 reference")
    others = torch.ones(40, dtype=torch.bool)
    others[slots.cpu()] = False
    assert torch.equal(k_cache[others.to(DEVICE)], sentinel[others.to(DEVICE)]), "wrote outside its slots"
    assert torch.equal(v_cache[others.to(DEVICE)], sentinel[others.to(DEVICE)]), "wrote outside its slots"

    qkv = triton_gemv.linear(x, w, norm_weight=norm_w, eps=EPS)
    uq, uk, uv = (t.reshape(m, -1, head_dim) for t in qkv.split([num_q * head_dim, num_kv * head_dim,
                                                                   num_kv * head_dim], dim=-1))
    uq = uq.clone()
    k2, v2 = sentinel.clone(), sentinel.clone()
    triton_fused.rope_and_write_kv(uq, uk, uv, cos, sin, positions, slots, k2, v2)
    assert_near(q.view(m, num_q, head_dim), uq.double(), dtype, "q vs unfused")
    assert_near(k_cache, k2.double(), dtype, "k vs unfused")
    assert_near(v_cache, v2.double(), dtype, "v vs unfused")


def test_gemv_rope_rejects_bad_arguments():
    x, w, _, _ = make_inputs(2, 128, 64, torch.float16, seed=1)
    cos, sin = rope_tables(8, 16)
    cache = torch.zeros(4, 2, 16, dtype=torch.float16, device=DEVICE)
    ids = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):       # 128 rows != (4 + 2 * 3) * 16
        triton_gemv.linear(x, w, rope=triton_gemv.RopeKV(cos, sin, ids, ids, cache, cache, 4, 3, 16))
    with pytest.raises(ValueError, match="caches"):
        triton_gemv.linear(x, w, rope=triton_gemv.RopeKV(cos, sin, ids, ids, cache[:, :1], cache, 4, 2, 16))
    with pytest.raises(ValueError, match="entries"):
        triton_gemv.linear(x, w, rope=triton_gemv.RopeKV(cos, sin, ids[:1], ids, cache, cache, 4, 2, 16))


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


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0+")
@pytest.mark.parametrize("rows", [1, 3])
def test_gemv_dependent_launch_keeps_order(rows):
    """Eight layers of in-place residual updates launched with PDL, eagerly and from a CUDA graph, give the
    same bits as ordinary launches: each kernel waits for the one before it reads anything it wrote."""
    torch.manual_seed(1)
    hidden, inter, dtype, layers = 512, 2048, torch.bfloat16, 8
    weights = [(torch.randn(hidden, hidden, device="cuda", dtype=dtype) / hidden ** 0.5,
                torch.randn(2 * inter, hidden, device="cuda", dtype=dtype) / hidden ** 0.5,
                torch.randn(hidden, inter, device="cuda", dtype=dtype) / inter ** 0.5) for _ in range(layers)]
    norm = torch.ones(hidden, device="cuda", dtype=dtype)
    residual = torch.empty(rows, hidden, device="cuda", dtype=dtype)
    start = torch.randn(rows, hidden, device="cuda", dtype=dtype)

    def chain(pdl: bool) -> torch.Tensor:
        for w_o, w_gu, w_down in weights:
            a = triton_gemv.linear(residual, w_o, norm_weight=norm, eps=EPS, dependent_launch=pdl)
            triton_gemv.linear(a, w_o, residual=residual, dependent_launch=pdl)
            h = triton_gemv.linear(residual, w_gu, norm_weight=norm, eps=EPS, silu_mul=True, dependent_launch=pdl)
            triton_gemv.linear(h, w_down, residual=residual, dependent_launch=pdl)
        return triton_gemv.linear(residual, w_o, out_dtype=torch.float32, dependent_launch=pdl)

    residual.copy_(start)
    expected = chain(False).clone()
    residual.copy_(start)
    assert torch.equal(chain(True), expected)
    graph = torch.cuda.CUDAGraph()
    residual.copy_(start)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        logits = chain(True)
    for _ in range(3):
        residual.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(logits, expected)


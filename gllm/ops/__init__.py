"""Kernels behind the model: attention over the paged KV cache.

`paged_attention` is the seam for fast GPU kernels (a later issue); the plain PyTorch path
runs everywhere.
"""

from gllm.ops.attention import paged_attention, write_kv

try:  # Triton is optional: without it (CPU-only installs) the model keeps the plain PyTorch path.
    from gllm.ops import triton_fused, triton_gemv
except ImportError:
    triton_fused = triton_gemv = None  # type: ignore[assignment]

__all__ = ["paged_attention", "triton_fused", "triton_gemv", "write_kv"]

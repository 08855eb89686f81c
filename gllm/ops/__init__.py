"""Kernels behind the model: paged attention (typed per-step plans), fused Triton kernels for the GPU.

This layer imports nothing of gllm above it: the model and the runner build its inputs.
"""

from gllm.ops.attention import (
    AttentionPlan,
    DecodeKernelPlan,
    MixedKernelPlan,
    PrefillKernelPlan,
    SdpaPlan,
    paged_attention,
    write_kv,
)

try:  # Triton is optional: without it (CPU-only installs) the model keeps the plain PyTorch path.
    from gllm.ops import triton_fused, triton_gemv
except ImportError:
    triton_fused = triton_gemv = None  # type: ignore[assignment]

__all__ = ["AttentionPlan", "DecodeKernelPlan", "MixedKernelPlan", "PrefillKernelPlan", "SdpaPlan",
           "paged_attention", "triton_fused", "triton_gemv", "write_kv"]

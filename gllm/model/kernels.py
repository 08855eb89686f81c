"""`ModelKernels`: which kernels the model's layers run, decided once at setup (by the runner's fast path)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKernels:
    fused: bool = False            # Triton RMSNorm, RoPE + K/V cache write, SiLU·mul (CUDA only)
    streamed_rows: int = 0         # steps of at most this many tokens take the weight-streaming GEMV kernels
    dependent_launch: bool = False  # the streamed kernels start reading weights while the one before finishes


PLAIN_KERNELS = ModelKernels()     # plain PyTorch: runs everywhere

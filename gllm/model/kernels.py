"""`ModelKernels`: which kernels the model's layers run, decided once at setup (by the runner's fast path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelKernels:
    fused: bool = False            # Triton RMSNorm, RoPE + K/V cache write, SiLU·mul (CUDA only)
    streamed_rows: int = 0         # steps of at most this many tokens take the weight-streaming GEMV kernels
    dependent_launch: bool = False  # the streamed kernels start reading weights while the one before finishes
    # float16 on the CPU: products of at least this many rows run in float32 (0: never). torch's CPU float16
    # matmul costs the same per row at any row count (it is not blocked): 512 rows take 4.7x the float32
    # time, while a few decode rows are fastest in float16 (half the bytes to read).
    upcast_rows: int = 0
    # A head kept quantized whose float values are at hand too (tied to a float embedding table, on the CPU):
    # products of at least this many rows use the float table (0: never). The int4 kernel's cost grows with the
    # rows, a float matmul's barely: the default model's Q8_0 head in 2 planes against bfloat16, 2 threads,
    # 1.7 / 3.7 ms at 1 row, 2.9 / 3.9 at 4, 5.7 / 4.4 at 8.
    float_head_rows: int = 0

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer(x)`, in float32 for a float16 product wide enough to be slow in float16 on the CPU."""
        if isinstance(layer, nn.Linear) and self._upcasts(x):
            return self.product(x, layer.weight, layer.bias)
        return layer(x)

    def product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """`F.linear(x, weight, bias)`, with the same float32 rule as `linear`."""
        if self._upcasts(x):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
        return F.linear(x, weight, bias)

    def _upcasts(self, x: torch.Tensor) -> bool:
        return bool(self.upcast_rows) and x.dtype == torch.float16 and x.shape[0] >= self.upcast_rows


PLAIN_KERNELS = ModelKernels()     # plain PyTorch: runs everywhere

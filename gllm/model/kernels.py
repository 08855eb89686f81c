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
    # matmul costs the same per row at any row count (about a conversion of the weight per row), while one or
    # two decode rows are fastest in float16 (half the bytes to read; the crossover: `CPU_UPCAST_ROWS`).
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
            return upcast_linear(x, weight, bias).to(x.dtype)
        return F.linear(x, weight, bias)

    def _upcasts(self, x: torch.Tensor) -> bool:
        return bool(self.upcast_rows) and x.dtype == torch.float16 and x.shape[0] >= self.upcast_rows


# A float32 block of the weight an upcast product converts at a time: at most this many bytes (and rows).
# Converting a large weight whole allocated a float32 copy every call, whose fresh pages cost more than the
# conversion: the default model's float16 head for 16 rows, 2 threads, 54 ms whole against 18 ms in blocks
# of 4,096 rows (2.9x; a 1B head 3.0x, its MLP's 16384 x 2048 2.8x; docs/benchmarks.md, session 27). Weights
# of one block or less are converted whole (the allocator keeps that memory: no gain in blocks).
UPCAST_BLOCK_BYTES = 16 << 20
UPCAST_BLOCK_ROWS = 4096


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x.float(), weight.float(), bias.float())` for a 2-D `x`, bit for bit (the same float32 product
    on each block of the weight's rows), converting the weight a block at a time into one reused buffer."""
    n, k = weight.shape
    rows = max(1, min(UPCAST_BLOCK_ROWS, UPCAST_BLOCK_BYTES // (4 * k), n))
    x32, bias32 = x.float(), None if bias is None else bias.float()
    if rows == n:   # a small weight: its float32 copy comes from memory the allocator keeps, one product
        return F.linear(x32, weight.float(), bias32)
    out = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    block = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        w = block[: stop - start]
        w.copy_(weight[start:stop])
        if bias32 is None:
            torch.matmul(x32, w.t(), out=out[:, start:stop])
        else:
            torch.addmm(bias32[start:stop], x32, w.t(), out=out[:, start:stop])
    return out


PLAIN_KERNELS = ModelKernels()     # plain PyTorch: runs everywhere

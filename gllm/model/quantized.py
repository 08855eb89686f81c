"""Weight-only quantization on load: the decoder layers' projections (q/k/v, o, gate/up, down) as int8 per
output channel or int4 in groups, kept quantized in memory (see `gllm.ops.quant` for the formats).

The embeddings, the norms and the output head stay in the model's dtype: the head decides every token and
(tied or not) is a small share of a model's bytes past the smallest ones, as in llama.cpp's Q4_K_M (which keeps
it at 6 bits). A projection whose shape int4 cannot pack falls back to int8, and the report says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gllm.ops.quant import (
    INT4_GROUP_SIZES,
    QuantizedWeight,
    check_int4_shape,
    pack_int4,
    quant_matmul,
    quantize_int4,
    quantize_int8,
)

# (layer, projection) -> the projection's int4 groups as the file stores them, (q, scale, group_min), or None
ExactInt4 = Callable[[int, str], "tuple[np.ndarray, np.ndarray, np.ndarray] | None"]
EXACT_GROUP_SIZE = 32      # GGUF's 4-bit blocks

SCHEMES = ("int8", "int4")
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantConfig:
    scheme: str                   # "int8" or "int4"
    group_size: int = 32          # int4: weights per (scale, zero) along K
    # The activations' dtype inside the quantized products (and the scales'). torch's CPU weight-only kernels
    # are vectorized for bfloat16 only: with float16 or float32 activations they run 5-25x slower than a float
    # matmul (docs/benchmarks.md), so the products take bfloat16 and hand back the model's dtype.
    compute_dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quant_group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")


class QuantizedLinear(nn.Module):
    """`nn.Linear` with its weight kept quantized (buffers, not parameters: nothing trains)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, scheme: str,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = weight
        self.scheme, self.compute_dtype = scheme, compute_dtype
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + (0 if self.bias is None else self.bias.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x.to(self.compute_dtype), self.qweight).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}"


@dataclass
class QuantReport:
    scheme: str
    float_bytes: int = 0                  # the projections before
    quantized_bytes: int = 0              # and after
    exact: int = 0                        # projections taken from the file's own 4-bit blocks
    fallbacks: list[str] = field(default_factory=list)   # int4 asked, int8 given (shape), with the reason


def quantize_layers(model: nn.Module, config: QuantConfig, exact: ExactInt4 | None = None) -> QuantReport:
    """Replace every decoder layer's projections by quantized ones, in place (already quantized: left alone).
    With int4, `exact` may give a projection's groups as a quantized file stores them (GGUF Q4_0 / Q4_1):
    those are packed as they are, in groups of 32, instead of requantizing their float values.
    The CPU kernels only: the model must be on the CPU."""
    report = QuantReport(config.scheme)
    for i, layer in enumerate(model.layers):
        for path in PROJECTIONS:
            owner_name, attr = path.split(".")
            owner = getattr(layer, owner_name)
            linear = getattr(owner, attr)
            if isinstance(linear, QuantizedLinear):
                report.quantized_bytes += linear.nbytes
                continue
            w = linear.weight
            if w.device.type != "cpu":
                raise ValueError("int8/int4 weights run on the CPU for now (GPU kernels: issue #22)")
            report.float_bytes += w.nbytes + (0 if linear.bias is None else linear.bias.nbytes)
            scheme = config.scheme
            if scheme == "int4":
                problem = check_int4_shape(*w.shape, config.group_size)
                if problem:
                    scheme = "int8"
                    report.fallbacks.append(f"layers.{i}.{path}: {problem}")
            dtype = config.compute_dtype
            stored = exact(i, path) if exact is not None and scheme == "int4" else None
            if stored is not None and check_int4_shape(*w.shape, EXACT_GROUP_SIZE) is None:
                q, scale, group_min = (torch.from_numpy(np.ascontiguousarray(a)) for a in stored)
                qw = pack_int4(q, scale, group_min, EXACT_GROUP_SIZE, dtype)
                report.exact += 1
            elif scheme == "int4":
                qw = quantize_int4(w, config.group_size, dtype)
            else:
                qw = quantize_int8(w, dtype)
            q = QuantizedLinear(qw, linear.bias, scheme, dtype)
            setattr(owner, attr, q)
            report.quantized_bytes += q.nbytes
    return report


def weight_bytes(model: nn.Module) -> int:
    """What the model's weights take in memory, quantized ones at their packed size."""
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return total + sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))

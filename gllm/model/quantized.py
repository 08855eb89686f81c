"""Weight-only quantization on load: the decoder layers' projections (q/k/v, o, gate/up, down) as int8 per
output channel or int4 in groups, kept quantized in memory (see `gllm.ops.quant` for the formats).

The embeddings, the norms and the output head stay in the model's dtype: the head decides every token and
(tied or not) is a small share of a model's bytes past the smallest ones, as in llama.cpp's Q4_K_M (which keeps
it at 6 bits). A projection whose shape int4 cannot pack falls back to int8, and the report says which.
A GGUF's own quantized blocks become int4 planes as they are (`planes_weight`; no requantization).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gllm.formats.gguf_quants import GROUP, Int4Planes
from gllm.ops.quant import (
    INT4_GROUP_SIZES,
    QuantizedWeight,
    StackedWeight,
    check_int4_shape,
    pack_int4,
    quant_matmul,
    quantize_int4,
    quantize_int8,
)

SCHEMES = ("int8", "int4")     # quantization on load ("float" and None are the engine's: no quantization)
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
            raise ValueError(f"quantization must be one of float, {', '.join(SCHEMES)}, got {self.scheme!r}")
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
        y = quant_matmul(x, self.qweight)          # the kernels cast x to compute_dtype (the scales' dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}"


@dataclass
class QuantReport:
    scheme: str
    float_bytes: int = 0                  # the projections before
    quantized_bytes: int = 0              # and after
    fallbacks: list[str] = field(default_factory=list)   # int4 asked, int8 given (shape), with the reason


def quantize_layers(model: nn.Module, config: QuantConfig) -> QuantReport:
    """Replace every decoder layer's float projections by quantized ones, in place (already quantized ones, such
    as a GGUF's own blocks, are left as they are). The CPU kernels only: the model must be on the CPU."""
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
            qw = quantize_int4(w, config.group_size, dtype) if scheme == "int4" else quantize_int8(w, dtype)
            q = QuantizedLinear(qw, linear.bias, scheme, dtype)
            setattr(owner, attr, q)
            report.quantized_bytes += q.nbytes
    return report


def planes_weight(parts: list[Int4Planes], dtype: torch.dtype) -> QuantizedWeight:
    """A projection from its parts' int4 planes (stacked along N in order): parts of one layout share one
    product; a change of layout starts another (a `StackedWeight`)."""
    runs: list[list[Int4Planes]] = []
    for part in parts:
        if runs and runs[-1][0].layout == part.layout:
            runs[-1].append(part)
        else:
            runs.append([part])
    packed = []
    for run in runs:
        q, scale, group_min = (torch.from_numpy(np.concatenate([getattr(p, a) for p in run]))
                               for a in ("q", "scale", "group_min"))
        packed.append(pack_int4(q, scale, group_min, GROUP, dtype, run[0].multipliers, run[0].chunk))
    return packed[0] if len(packed) == 1 else StackedWeight(tuple(packed))


def weight_bytes(model: nn.Module) -> int:
    """What the model's weights take in memory, quantized ones at their packed size."""
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return total + sum(m.qweight.nbytes for m in model.modules() if isinstance(m, QuantizedLinear))


def projection_formats(model: nn.Module) -> dict[str, int]:
    """How many decoder projections hold each quantized format ("int8", "int4", a GGUF type such as "Q4_K" or
    "Q4_K/Q6_K" for a fused one with parts in both); float projections are not counted."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            counts[m.scheme] = counts.get(m.scheme, 0) + 1
    return counts

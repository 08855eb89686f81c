"""Weight-only quantization on load: the decoder layers' projections (q/k/v, o, gate/up, down) as int8 per
output channel or int4 in groups, kept quantized in memory (see `gllm.ops.quant` for the formats).

On the CPU the embeddings and the norms stay in the model's dtype (a GGUF's head stays in its blocks when the
int4 kernel takes them: see `load_gguf`). A projection whose shape
int4 cannot pack falls back to int8, and the report says which. A GGUF's own quantized blocks become int4 planes
as they are (`planes_weight`; no requantization).

On a GPU the projections are `GpuQuantizedLinear`s instead: the Triton kernels' layout (`QuantWeight`): int4 in
groups (asymmetric), int8 in groups of up to 128 (symmetric), a GGUF's blocks as affine codes
(`gllm.formats.gguf_quants.affine_codes`), all dequantized in registers by the decode GEMV. There the embeddings
and the head are kept quantized too (`QuantizedEmbedding`, a `GpuQuantizedLinear` head; one weight for both
when they are tied): in an 8B model they are 2 GB of bfloat16, a quarter of an 8 GB card. On load the head
takes int8 (it decides every token; llama.cpp's Q4_K_M keeps it at 6 bits) and the embeddings the scheme.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gllm.formats.gguf_quants import GROUP, AffineCodes, Int4Planes
from gllm.ops.quant import (
    INT4_GROUP_SIZES,
    Int4Weight,
    QuantizedWeight,
    StackedWeight,
    check_int4_shape,
    concat_int4,
    pack_int4,
    quant_matmul,
    quantize_int4,
    quantize_int8,
)
from gllm.ops.quant_layout import INTERLEAVE, SUPER_BLOCK, QuantWeight, pack_nibbles, quantize_k
from gllm.ops.quant_layout import quantize as quantize_grouped

SCHEMES = ("int8", "int4", "q4_k_m")   # quantization on load ("float" and None are the engine's: none)
GPU_ONLY_SCHEMES = ("q4_k_m",)
PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantConfig:
    scheme: str                   # "int8", "int4" or "q4_k_m" (GPU only: llama.cpp's Q4_K_M mix, see `k_mix`)
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
    def qweight_bytes(self) -> int:
        return self.qweight.nbytes

    @property
    def nbytes(self) -> int:
        return self.qweight_bytes + (0 if self.bias is None else self.bias.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.qweight)          # the kernels cast x to compute_dtype (the scales' dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}"


class GpuQuantizedLinear(nn.Module):
    """A projection kept in the GPU kernels' layout, as one or more parts stacked along its outputs (a fused
    q/k/v whose parts a file stores in different types). Decode-sized inputs (up to the GEMV's `MAX_ROWS` rows)
    run the quantized GEMV, reading the weight once in 4 or 8 bits; wider ones dequantize it and run one dense
    matmul."""

    compute_dtype = None          # products in the activations' dtype, accumulated in float32

    def __init__(self, parts: list[QuantWeight], scheme: str, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("the parts of a quantized projection must share in_features")
        self.scheme = scheme
        # A plain attribute, not buffers: `build_model` swaps modules in on the meta device and then calls
        # `.to(dtype)`, which would turn the float16 scales into the model dtype.
        self.parts = list(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def qweight_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def nbytes(self) -> int:
        return self.qweight_bytes + (0 if self.bias is None else self.bias.nbytes)

    def _spans(self) -> list[tuple[QuantWeight, slice]]:
        """Each part with the output columns it fills."""
        spans, at = [], 0
        for part in self.parts:
            spans.append((part, slice(at, at + part.out_features)))
            at += part.out_features
        return spans

    # Wider products dequantize the weight first; one larger than this many weights (an output head: 525M in
    # an 8B model) is dequantized and multiplied in slices, not into one transient of its full size.
    DENSE_SLICE = 1 << 27

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gllm.ops import triton_quant_gemv as kernels  # Triton: imported where a GPU runs it
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= kernels.MAX_ROWS:
            y = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype, device=x.device)
            for part, cols in self._spans():
                kernels.quant_gemv(flat, part, out=y[:, cols])
        elif self.out_features * self.in_features <= self.DENSE_SLICE:
            weight = torch.empty((self.out_features, self.in_features), dtype=x.dtype, device=x.device)
            for part, rows in self._spans():
                kernels.dequantize_dense(part, x.dtype, out=weight[rows])
            y = F.linear(flat, weight)
        else:
            y = torch.empty((flat.shape[0], self.out_features), dtype=x.dtype, device=x.device)
            step = max(INTERLEAVE, self.DENSE_SLICE // self.in_features // INTERLEAVE * INTERLEAVE)
            for part, cols in self._spans():
                for start in range(0, part.out_features, step):
                    piece = part.row_slice(start, start + step)
                    at = cols.start + start
                    y[:, at:at + piece.out_features] = F.linear(flat, kernels.dequantize_dense(piece, x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def row(self, x: torch.Tensor, *, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            silu_mul: bool = False, residual: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, dependent_launch: bool = False) -> torch.Tensor:
        """One decode row [1, K] through the row kernel, with the RMSNorm before it (`norm_weight`) or the
        SiLU·mul of a [1, 2K] gate/up row (`silu_mul`) done by the launch that prepares its input, and the
        residual add after it (`residual`, [1, N], updated in place and returned) done by the kernel. The
        product comes in `out_dtype` (default x's; float32 for logits, from the float32 sums).
        `dependent_launch`: the launches overlap the kernel before each (see `triton_gemv.linear`)."""
        from gllm.ops.triton_quant_gemv import RowInputs, quant_gemv_row, row_block, row_inputs
        if self.bias is not None:
            raise ValueError("the row kernel has no bias epilogue")
        out = residual if residual is not None else torch.empty((1, self.out_features), dtype=out_dtype or x.dtype,
                                                                 device=x.device)
        inputs: dict[tuple[int, int], RowInputs] = {}   # by code width and block: the packing depends on them
        for part, cols in self._spans():
            key = (part.packing, row_block(x.dtype, part.group))
            if key not in inputs:
                inputs[key] = row_inputs(x, part.packing, block=key[1], norm_weight=norm_weight, eps=eps,
                                         silu_mul=silu_mul, dependent_launch=dependent_launch)
            view = out[:, cols]
            quant_gemv_row(inputs[key], part, residual=view if residual is not None else None,
                           out=None if residual is not None else view, dependent_launch=dependent_launch)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme}"


class QuantizedEmbedding(nn.Module):
    """The token embedding kept in the GPU kernels' layout (`QuantWeight`, [vocab, hidden]): a lookup
    dequantizes only the rows it reads (`gllm.ops.triton_embedding.embed_quantized_tokens`), into `dtype`.
    With tied embeddings the model's head is a `GpuQuantizedLinear` over the same weight."""

    def __init__(self, weight: QuantWeight, scheme: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight = weight          # a plain attribute, as `GpuQuantizedLinear.parts` (see there)
        self.scheme = scheme
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes

    def lookup(self, input_ids: torch.Tensor, token_source: tuple[torch.Tensor, torch.Tensor] | None = None,
               dependent_launch: bool = False) -> torch.Tensor:
        """Rows for `input_ids` (any shape), each token taken from the device's sampled ids where
        `token_source` says so (see `gllm.ops.triton_embedding.embed_tokens`)."""
        from gllm.ops.triton_embedding import embed_quantized_tokens  # Triton: imported where a GPU runs it
        flat = embed_quantized_tokens(self.qweight, input_ids.reshape(-1), self.dtype, token_source,
                                      dependent_launch)
        return flat.reshape(*input_ids.shape, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme}"


def quantize_embeddings(model: nn.Module, config: QuantConfig) -> list[str]:
    """On a GPU, the token embedding and the output head into the kernels' layout, in place: the head in int8
    (groups of up to 128; q6_k for q4_k_m, as llama.cpp's Q4_K_M keeps it), an untied embedding in the scheme
    (q4_k for q4_k_m), a tied pair as one weight in the head's. Ones already quantized (a GGUF's kept blocks)
    are left as they are. Returns what was done, e.g. ["head int8", "embeddings int4"] (nothing on the CPU)."""
    embed, head = model.embed_tokens, model.lm_head
    floats = [m.weight for m in (embed, head) if isinstance(m, (nn.Embedding, nn.Linear))]
    if not floats or floats[0].device.type != "cuda":
        return []
    k_mix_scheme = config.scheme == "q4_k_m"
    head_scheme = "q6_k" if k_mix_scheme else "int8"
    embed_scheme = "q4_k" if k_mix_scheme else config.scheme
    dtype, done = floats[0].dtype, []
    if head is None:                    # tied: one weight, looked up and multiplied
        if isinstance(embed, nn.Embedding):
            weight, scheme = gpu_quantized(embed.weight.detach(), head_scheme, config.group_size)
            if weight is not None:
                model.embed_tokens = QuantizedEmbedding(weight, scheme, dtype)
                model.lm_head = GpuQuantizedLinear([weight], scheme)
                done += [f"head {scheme}", f"embeddings {scheme} (tied to the head)"]
        return done
    if isinstance(head, nn.Linear):
        weight, scheme = gpu_quantized(head.weight.detach(), head_scheme, config.group_size)
        if weight is not None:
            model.lm_head = GpuQuantizedLinear([weight], scheme)
            done.append(f"head {scheme}")
    if isinstance(embed, nn.Embedding):
        weight, scheme = gpu_quantized(embed.weight.detach(), embed_scheme, config.group_size)
        if weight is not None:
            model.embed_tokens = QuantizedEmbedding(weight, scheme, dtype)
            done.append(f"embeddings {scheme}")
    return done


def gpu_int8_group(k: int) -> int | None:
    """int8 on a GPU: groups of 128 along K where K allows (8.1 bits a weight; the kernels need groups, not
    one scale per output channel), else the largest of 64, 32, 16 that divides K."""
    return next((g for g in (128, 64, 32, 16) if k % g == 0), None)


K_QUANT_BLOCK_ROWS = 8192   # rows quantized at a time into a K-quant kind (an 8B head: 128k rows)


def gpu_quantized(weight: torch.Tensor, scheme: str, group_size: int) -> tuple[QuantWeight | None, str]:
    """`weight` [N, K] (on the GPU) in the kernels' layout: (weight, scheme given) — "int4", "int8", or a
    K-quant kind ("q4_k", "q6_k"; quantized a block of rows at a time); int4 and the K-quants fall back to
    int8 where K is no multiple of their group (256 for the K-quants), and (None, why) where nothing fits."""
    n, k = weight.shape
    if scheme in ("q4_k", "q6_k") and k % SUPER_BLOCK == 0:
        blocks = (quantize_k(weight[a:a + K_QUANT_BLOCK_ROWS], scheme) for a in range(0, n, K_QUANT_BLOCK_ROWS))
        return stack_row_blocks(blocks, n), scheme
    if scheme == "int4" and k % group_size == 0:
        return quantize_grouped(weight, 4, group_size), "int4"
    group = gpu_int8_group(k)
    if group is None:
        return None, f"K ({k}) is not a multiple of 16"
    return quantize_grouped(weight, 8, group), "int8"


def affine_weight(parts: list[AffineCodes], device: torch.device) -> list[QuantWeight]:
    """A projection's GGUF parts (stacked along N in order) in the kernels' layout on `device`: consecutive parts
    of the same layout (kind, bits, group, offsets or not) share one `QuantWeight`."""
    runs: list[list[AffineCodes]] = []
    for part in parts:
        key = (part.kind, part.bits, part.group, part.zero is None)
        if runs and (runs[-1][0].kind, runs[-1][0].bits, runs[-1][0].group, runs[-1][0].zero is None) == key:
            runs[-1].append(part)
        else:
            runs.append([part])
    out = []
    for run in runs:
        def stacked(arrays: list[np.ndarray | None]) -> torch.Tensor | None:
            return None if arrays[0] is None else torch.from_numpy(np.concatenate(arrays)).to(device)
        first = run[0]
        codes = stacked([p.codes for p in run])
        packed = pack_nibbles(codes) if first.bits == 4 else codes
        out.append(QuantWeight.from_rows(packed, stacked([p.scale for p in run]), stacked([p.zero for p in run]),
                                         first.bits, first.group, first.kind, stacked([p.lead for p in run])))
    return out


def affine_weight_in_blocks(blocks: Iterable[AffineCodes], rows: int, device: torch.device) -> QuantWeight:
    """One large GGUF tensor (an embedding table or head of 50-130 k rows) in the kernels' layout on `device`,
    its blocks of rows (multiples of the layout's quads, but the last) decoded and moved one at a time into a
    weight allocated once: decoded whole, an 8B Q6_K head made ~2 GB of host temporaries."""
    return stack_row_blocks((affine_weight([block], device)[0] for block in blocks), rows)


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's Q4_K_M gives these layers' attn_v and ffn_down six bits: the first and last eighth of the
    layers and every third one between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def k_mix(weight: torch.Tensor, path: str, layer: int, layers: int, v_rows: int = 0) -> tuple[list[QuantWeight], str]:
    """A projection's float weight [N, K] (K a multiple of 256) quantized as llama.cpp's Q4_K_M mix would
    store it: q4_k, but for a "more bits" layer's (`more_bits`) down projection and the v rows of its fused
    q/k/v (the last `v_rows`), which take q6_k. Returns the parts and their label ("q4_k", "q4_k/q6_k", ...)."""
    six = more_bits(layer, layers)
    if six and path == "mlp.down_proj":
        parts = [quantize_k(weight, "q6_k")]
    elif six and v_rows:
        parts = [quantize_k(weight[:-v_rows], "q4_k"), quantize_k(weight[-v_rows:], "q6_k")]
    else:
        parts = [quantize_k(weight, "q4_k")]
    return parts, "/".join(dict.fromkeys(p.kind for p in parts))


def stack_row_blocks(pieces: Iterable[QuantWeight], rows: int) -> QuantWeight:
    """Weights of consecutive blocks of rows (multiples of the layout's quads, but the last) as one weight of
    `rows` rows, allocated once and filled a block at a time (a large table's temporaries stay a block's)."""
    quads = -(-rows // INTERLEAVE)
    out: QuantWeight | None = None
    at = 0                                           # quads of rows filled so far
    for piece in pieces:
        if out is None:
            out = piece._with(tuple(None if t is None else t.new_empty(quads, *t.shape[1:])
                                    for t in piece._tensors()), rows)
        if at * INTERLEAVE + piece.out_features > rows or (piece.out_features % INTERLEAVE
                                                            and at * INTERLEAVE + piece.out_features != rows):
            raise ValueError(f"blocks of {piece.out_features} rows do not stack into {rows} on quads of {INTERLEAVE}")
        span = slice(at, at + piece.words.shape[0])
        for whole, part in zip(out._tensors(), piece._tensors()):
            if whole is not None:
                whole[span] = part
        at = span.stop
    if out is None or at != quads:
        raise ValueError(f"the blocks hold {at * INTERLEAVE} rows, not {rows}")
    return out


QUANTIZED_LINEARS = (QuantizedLinear, GpuQuantizedLinear)


@dataclass
class QuantReport:
    scheme: str
    float_bytes: int = 0                  # the projections before
    quantized_bytes: int = 0              # and after
    fallbacks: list[str] = field(default_factory=list)   # int4 asked, int8 given (shape), with the reason


def quantize_layers(model: nn.Module, config: QuantConfig) -> QuantReport:
    """Replace every decoder layer's float projections by quantized ones, in place (already quantized ones, such
    as a GGUF's own blocks, are left as they are): the CPU kernels' formats on the CPU, the Triton kernels' layout
    on a GPU."""
    report = QuantReport(config.scheme)
    for i, layer in enumerate(model.layers):
        for path in PROJECTIONS:
            owner_name, attr = path.split(".")
            owner = getattr(layer, owner_name)
            linear = getattr(owner, attr)
            if isinstance(linear, QUANTIZED_LINEARS):
                report.quantized_bytes += linear.nbytes
                continue
            w = linear.weight
            before = w.nbytes + (0 if linear.bias is None else linear.bias.nbytes)
            if w.device.type == "cuda" and config.scheme == "q4_k_m" and w.shape[1] % SUPER_BLOCK == 0:
                v_rows = model.cfg.kv_size if path == "self_attn.qkv_proj" else 0
                parts, scheme = k_mix(w.detach(), path, i, len(model.layers), v_rows)
                q = GpuQuantizedLinear(parts, scheme, linear.bias)
            elif w.device.type == "cuda":
                asked = "int8" if config.scheme == "q4_k_m" else config.scheme
                qw, scheme = gpu_quantized(w.detach(), asked, config.group_size)
                if qw is None:
                    report.fallbacks.append(f"layers.{i}.{path}: kept float, {scheme}")
                    continue
                if scheme != config.scheme:
                    group = SUPER_BLOCK if asked != config.scheme else config.group_size
                    report.fallbacks.append(f"layers.{i}.{path}: K ({w.shape[1]}) is not a multiple of the "
                                            f"group size ({group})")
                q = GpuQuantizedLinear([qw], scheme, linear.bias)
            elif w.device.type == "cpu" and config.scheme not in GPU_ONLY_SCHEMES:
                scheme = config.scheme
                if scheme == "int4":
                    problem = check_int4_shape(*w.shape, config.group_size)
                    if problem:
                        scheme = "int8"
                        report.fallbacks.append(f"layers.{i}.{path}: {problem}")
                dtype = config.compute_dtype
                qw = quantize_int4(w, config.group_size, dtype) if scheme == "int4" else quantize_int8(w, dtype)
                q = QuantizedLinear(qw, linear.bias, scheme, dtype)
            else:
                raise ValueError(f"{config.scheme} weights run on "
                                 f"{'CUDA GPUs' if config.scheme in GPU_ONLY_SCHEMES else 'the CPU and on CUDA GPUs'}"
                                 f", not on {w.device.type}")
            report.float_bytes += before
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


def planes_weight_in_blocks(blocks: Iterable[Int4Planes], dtype: torch.dtype) -> Int4Weight:
    """One large weight (a head of 50-130 k rows) decoded and packed a block of rows at a time: its
    temporaries (the decoded planes take a byte a code, torch packs from 4 bytes a code) stay a block's."""
    return concat_int4([pack_int4(*(torch.from_numpy(getattr(b, a)) for a in ("q", "scale", "group_min")), GROUP,
                                  dtype, b.multipliers, b.chunk) for b in blocks])


def weight_bytes(model: nn.Module) -> int:
    """What the model's weights take in memory, quantized ones at their packed size (a weight shared by a tied
    embedding and head counted once)."""
    total = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    packed: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.qweight_bytes
        elif isinstance(m, GpuQuantizedLinear):
            packed.update((p.words.data_ptr(), p.nbytes) for p in m.parts)
        elif isinstance(m, QuantizedEmbedding):
            packed[m.qweight.words.data_ptr()] = m.qweight.nbytes
    return total + sum(packed.values())


def projection_formats(model: nn.Module) -> dict[str, int]:
    """How many decoder projections hold each quantized format ("int8", "int4", a GGUF type such as "Q4_K" or
    "Q4_K/Q6_K" for a fused one with parts in both); float projections are not counted."""
    counts: dict[str, int] = {}
    for m in model.layers.modules():
        if isinstance(m, QUANTIZED_LINEARS):
            counts[m.scheme] = counts.get(m.scheme, 0) + 1
    return counts


def head_formats(model: nn.Module) -> str:
    """The head's and the embeddings' formats where they are kept quantized, e.g. "head Q6_K, embeddings Q4_K"
    ("" when both are in the model's dtype)."""
    parts = []
    if isinstance(model.lm_head, QUANTIZED_LINEARS):
        parts.append(f"head {model.lm_head.scheme}")
    if isinstance(model.embed_tokens, QuantizedEmbedding):
        tied = isinstance(model.lm_head, GpuQuantizedLinear) and model.lm_head.parts[0] is model.embed_tokens.qweight
        parts.append(f"embeddings {model.embed_tokens.scheme}{' (tied)' if tied else ''}")
    return ", ".join(parts)

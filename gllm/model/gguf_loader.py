"""Load a Llama 3.x model from a GGUF file (llama.cpp's format), memory-mapped, with no converted copy on disk.

The file is read with the `gguf` package (llama.cpp's own Python reader). Its `llama.*` metadata
becomes a HF-style config dict and then a `ModelConfig`. The decoder projections stored in a type that
maps onto int4 planes (`keep_types`: Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0; see
`gllm.formats.gguf_quants`) stay quantized, read from the blocks' bits into the CPU int4 kernel's layout;
every other tensor is dequantized one at a time to float32 (`gguf.quants.dequantize`: F32, F16, BF16, the
quantized types, the IQ types...), renamed to HF checkpoint names, and streamed into `build_model` in the
model's dtype.

Two things llama.cpp's converter does to a HF checkpoint are undone here:
- the rows of `attn_q`/`attn_k` are permuted so that RoPE rotates interleaved pairs (GPT-J style);
  HF's Llama rotates halves, so each head's rows are put back in HF order;
- Llama 3.1+'s `llama3` RoPE scaling is not stored as parameters but as a `rope_freqs.weight`
  tensor of per-frequency divisors; the parameters are recovered from it and checked against it.
The tokenizer lives in the same file's metadata: see `gllm.tokenizer.gguf_tokenizer`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from gllm.formats.gguf import GGUFFile, gguf_file_from_reader, open_gguf
from gllm.formats.gguf_quants import PLANE_TYPES, affine_codes, int4_planes
from gllm.memory import release_free_memory
from gllm.model.config import ModelConfig, RopeConfig, parse_dtype
from gllm.model.llama import LlamaForCausalLM
from gllm.model.quantized import (
    PROJECTIONS,
    GpuQuantizedLinear,
    QuantizedEmbedding,
    QuantizedLinear,
    affine_weight,
    affine_weight_in_blocks,
    planes_weight,
    planes_weight_in_blocks,
)
from gllm.ops.quant import check_int4_shape

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
HEAD_BLOCK_ROWS = 4096   # a head's or embedding's rows decoded at a time (a multiple of the layouts' row blocks)

# GGUF tensor name (without the ".weight"/".bias" suffix) -> HF checkpoint name.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Tensors llama.cpp writes that carry no weights of their own (rope_freqs is read into the config).
_SKIPPED = {"rope_freqs.weight"}
# llama.cpp's stock Llama 3.x rope scaling (the factor is read from the file; these are the rest).
_LLAMA3_DEFAULTS = (1.0, 4.0, 8192)


# --- config ---------------------------------------------------------------------------------------


def gguf_to_hf_config(info: GGUFFile, rope_freqs: np.ndarray | None = None) -> dict[str, Any]:
    """A transformers-style config dict for a `llama`-architecture GGUF file.

    ``rope_freqs`` is the file's `rope_freqs.weight` tensor, if it has one (Llama 3.1+)."""
    arch = info.architecture
    where = str(info.path)
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{where!r}: GGUF architecture {arch!r} is not supported; gllm runs Llama 3.x "
                         f"models (general.architecture 'llama')")
    md = info.metadata

    def key(name: str, default: Any = ..., kind: type = int) -> Any:
        value = md.get(f"{arch}.{name}")
        if value is None:
            if default is ...:
                raise ValueError(f"{where!r}: GGUF metadata lacks {arch}.{name}")
            return default
        return [kind(v) for v in value] if isinstance(value, list) else kind(value)

    if key("expert_count", 0):
        raise ValueError(f"{where!r}: mixture-of-experts GGUF models ({arch}.expert_count="
                         f"{key('expert_count')}) are not supported")
    hidden = key("embedding_length")
    heads = key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    for what, value in (("attention.head_count", heads), ("attention.head_count_kv", kv_heads)):
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"{where!r}: per-layer {arch}.{what} {value} is not supported")
    heads = heads[0] if isinstance(heads, list) else heads
    kv_heads = kv_heads[0] if isinstance(kv_heads, list) else kv_heads
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or hidden // heads
    value_dim = key("attention.value_length", head_dim)
    rot_dim = key("rope.dimension_count", head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{where!r}: key length {head_dim} != value length {value_dim} is not supported")
    if rot_dim != head_dim:
        raise ValueError(f"{where!r}: partial rotary embeddings ({arch}.rope.dimension_count={rot_dim}, "
                         f"head dim {head_dim}) are not supported")

    tokens = md.get("tokenizer.ggml.tokens")
    embd_rows = info.tensor_shapes.get("token_embd.weight", (None,))[0]
    vocab = key("vocab_size", None) or (len(tokens) if tokens else None) or embd_rows
    if vocab is None:
        raise ValueError(f"{where!r}: cannot tell the vocabulary size ({arch}.vocab_size, "
                         f"tokenizer.ggml.tokens and token_embd.weight are all missing)")
    if embd_rows is not None and embd_rows != vocab:
        raise ValueError(f"{where!r}: token_embd.weight has {embd_rows} rows but the vocabulary has {vocab} "
                         f"tokens")

    theta = key("rope.freq_base", 10000.0, float)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = md.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{where!r}: RoPE scaling {scaling!r} ({arch}.rope.scaling.type) is not supported; "
                         f"gllm supports none and Llama 3's (rope_freqs.weight)")
    if rope_freqs is not None:
        original = key("rope.scaling.original_context_length", _LLAMA3_DEFAULTS[2])
        rope = llama3_rope_from_freq_factors(rope_freqs, theta, head_dim, original, where)

    eos = [md[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                           "tokenizer.ggml.eom_token_id") if md.get(k) is not None]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5, float),
        "max_position_embeddings": key("context_length", 8192),
        "tie_word_embeddings": "output.weight" not in info.tensor_types,
        "attention_bias": "blk.0.attn_q.bias" in info.tensor_types,
        "mlp_bias": "blk.0.ffn_gate.bias" in info.tensor_types,
        "rope_parameters": rope,
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(i) for i in eos)),
        "torch_dtype": "float32",
    }


def llama3_rope_from_freq_factors(factors: np.ndarray, theta: float, head_dim: int, original_context: int,
                                  where: str = "GGUF") -> dict[str, Any]:
    """Llama 3's RoPE scaling parameters from the per-frequency divisors llama.cpp stores.

    llama.cpp's converter turns (factor, low_freq_factor, high_freq_factor, original context) into
    one divisor per rotary frequency: 1 for short wavelengths, `factor` for long ones, a smooth blend
    between. That curve fixes `factor` (the largest divisor) and, given the original context, the
    low/high factors up to the blend band. Llama 3.1/3.2/3.3 all use low=1, high=4, context 8192;
    anything else is fitted from the blended frequencies. The result is checked against every
    stored divisor, so a file that is not Llama 3 scaling gets an error, not a wrong model."""
    f = np.asarray(factors, dtype=np.float64).reshape(-1)
    if f.shape[0] != head_dim // 2:
        raise ValueError(f"{where!r}: rope_freqs.weight has {f.shape[0]} entries, expected head_dim/2 = "
                         f"{head_dim // 2}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return {"rope_type": "default", "rope_theta": theta}
    from gllm.model.rope import rope_inv_freq

    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    target = inv / f
    factor = float(f.max())
    candidates = [(_LLAMA3_DEFAULTS[0], _LLAMA3_DEFAULTS[1], int(original_context))]
    blended = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if blended.sum() >= 2 and factor > 1:
        # 1/f = 1/factor + s (1 - 1/factor), s = (context / wavelength - low) / (high - low)
        s = (1 / f[blended] - 1 / factor) / (1 - 1 / factor)
        x = original_context * inv[blended] / (2 * math.pi)
        slope, intercept = np.polyfit(x, s, 1)
        if slope > 0:
            low = -intercept / slope
            candidates.append((round(float(low), 6), round(float(low + 1 / slope), 6), int(original_context)))
    for low, high, context in candidates:
        rope = RopeConfig(theta=theta, rope_type="llama3", factor=factor, low_freq_factor=low,
                          high_freq_factor=high, original_max_position_embeddings=context)
        got = rope_inv_freq(rope, head_dim).double().numpy()
        if np.allclose(got, target, rtol=1e-4, atol=0):
            return {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": context}
    raise ValueError(f"{where!r}: rope_freqs.weight {np.round(f, 4).tolist()} does not follow Llama 3's "
                     f"RoPE frequency scaling; this RoPE scaling is not supported")


# --- tensors --------------------------------------------------------------------------------------


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`);
    None for tensors that are not weights (rope_freqs)."""
    if gguf_name in _SKIPPED:
        return None
    base, dot, suffix = gguf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r} for a llama model")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf's `LlamaModel.permute`).

    The converter views each head's rows as (2, head_dim/2) -- HF's two rotate-half halves -- and
    transposes them to (head_dim/2, 2), interleaving the halves so GGML's RoPE can rotate adjacent
    pairs. Viewing the stored rows as (head_dim/2, 2) and transposing back restores HF's order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor, where: str = "GGUF", rows: slice = slice(None)) -> np.ndarray:
    """A GGUF reader tensor (or some of its outermost rows) as float32 in HF layout (outermost dimension
    first)."""
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data = tensor.data if rows == slice(None) else tensor.data[rows]
    try:
        w = dequantize(data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{where!r}: tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, "
                         f"which gguf cannot dequantize (unsupported tensor type)") from None
    except Exception as exc:
        raise ValueError(f"{where!r}: cannot dequantize tensor {tensor.name!r} "
                         f"({tensor.tensor_type.name}): {type(exc).__name__}: {exc}") from exc
    return np.asarray(w, dtype=np.float32).reshape(-1, *shape[1:])


@dataclass(frozen=True)
class GGUFTensor:
    """A GGUF tensor still in the (memory-mapped) file. `copy_to` dequantizes it into a parameter some
    thousand rows at a time: gguf's dequantizer makes float32 temporaries a few times the size of what it
    is given, which for a whole embedding (49,152 x 576 in the default model) raised a load's peak memory
    by ~300 MB."""
    tensor: Any
    shape: tuple[int, ...]
    heads: int | None          # attn_q / attn_k: rows un-permuted over this many heads
    where: str

    CHUNK_ROWS = 4096

    def load(self) -> torch.Tensor:
        w = dequantize_tensor(self.tensor, self.where).reshape(self.shape)
        if self.heads is not None:
            w = unpermute_qk(w, self.heads)
        if not w.flags.writeable or not w.flags.c_contiguous:
            w = np.array(w, dtype=np.float32, order="C")  # F32 tensors are views of the file
        return torch.from_numpy(w)

    def copy_to(self, out: torch.Tensor) -> None:
        if self.heads is not None or len(self.shape) < 2:
            out.copy_(self.load())
            return
        for start in range(0, self.shape[0], self.CHUNK_ROWS):
            rows = slice(start, min(start + self.CHUNK_ROWS, self.shape[0]))
            chunk = dequantize_tensor(self.tensor, self.where, rows)
            out[rows].copy_(torch.from_numpy(chunk if chunk.flags.writeable else chunk.copy()))   # F32: the file
            if self.shape[0] > self.CHUNK_ROWS:
                del chunk
                release_free_memory()      # glibc would keep the dequantizer's temporaries (~100 MB for 49k rows)


def iter_gguf_weights(reader, cfg: ModelConfig, where: str = "GGUF",
                      skip: Collection[str] = ()) -> Iterator[tuple[str, GGUFTensor]]:
    """HF-named tensors of a GGUF reader, still in the file (not those whose GGUF names are in `skip`)."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None or tensor.name in skip:
            continue
        heads = None
        if tensor.name.startswith("blk.") and ".attn_q." in tensor.name:
            heads = cfg.num_attention_heads
        elif tensor.name.startswith("blk.") and ".attn_k." in tensor.name:
            heads = cfg.num_key_value_heads
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        yield name, GGUFTensor(tensor, shape, heads, where)


def _check_tensor_types(reader, where: str) -> None:
    """Refuse a file with a tensor type gguf cannot dequantize before allocating the model."""
    import gguf.quants
    from gguf.constants import GGMLQuantizationType as Q

    traits = getattr(gguf.quants, "_type_traits", None)  # private; without it dequantize() still raises
    if traits is None:
        return
    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16) and t.tensor_type not in traits:
            raise ValueError(f"{where!r}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which gguf "
                             f"cannot dequantize (unsupported tensor type)")


def load_gguf(path: str | Path, *, dtype: str | torch.dtype, device: str | torch.device, max_positions: int,
              weight_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
              progress: bool = False, keep_types: Collection[str] = (),
              compute_dtype: torch.dtype = torch.bfloat16) -> tuple[LlamaForCausalLM, ModelConfig, GGUFFile]:
    """Load a `llama`-architecture GGUF file into a gllm model.

    Returns (model, config, file info). A decoder projection whose every part is stored in one of
    ``keep_types`` (a subset of `PLANE_TYPES`) is kept quantized: on the CPU a `QuantizedLinear` whose
    products run in ``compute_dtype``, on a GPU a `GpuQuantizedLinear` (the Triton kernels' layout); the head
    stored in ``keep_types`` is kept so too, and on a GPU the embeddings (`QuantizedEmbedding`). Every
    other tensor is dequantized to float32, put in HF layout and copied into the model in ``dtype`` on
    ``device``; ``weight_transform(hf_name, tensor)`` sees each one first. The tokenizer comes from
    `gllm.tokenizer.gguf_tokenizer.tokenizer_from_gguf` (pass it the returned file info to avoid parsing the
    file twice).
    """
    from gllm.model.loader import build_model, with_progress  # loader may route .gguf paths here: import late

    reader = open_gguf(path)
    info = gguf_file_from_reader(reader, Path(path).expanduser())
    where = str(info.path)
    rope_freqs = None
    by_name = {t.name: t for t in reader.tensors}
    if info.architecture in SUPPORTED_GGUF_ARCHITECTURES and "rope_freqs.weight" in by_name:
        rope_freqs = dequantize_tensor(by_name["rope_freqs.weight"], where)
    cfg = ModelConfig.from_hf_dict(gguf_to_hf_config(info, rope_freqs))
    _check_tensor_types(reader, where)
    for name in info.tensor_types:
        hf_tensor_name(name)  # fail on a foreign tensor before allocating the model
    gpu = torch.device(device).type == "cuda"
    kept = kept_projections(by_name, cfg, keep_types, gpu=gpu)
    # On a GPU the embeddings and the head stay in their blocks too (one weight when tied). On the CPU the head
    # does beside bfloat16 or float32 activations (the default model's Q8_0 head as int4 planes: ~3.3 ms a
    # step on one thread against 6.8 in bfloat16), not beside float16 ones, whose matmul reads it faster
    # (3.5 against 7.4 ms with torch's AVX2 kernels); the embedding lookup keeps the float table.
    kept_ends = [n for n in ("token_embd.weight", "output.weight")
                 if gpu and n in by_name and by_name[n].tensor_type.name in keep_types]
    head_name = "output.weight" if "output.weight" in by_name else "token_embd.weight"
    head = by_name.get(head_name)
    cpu_head = (not gpu and parse_dtype(dtype) != torch.float16 and head is not None
                and head.tensor_type.name in keep_types
                and check_int4_shape(int(head.shape[1]), int(head.shape[0]), 32) is None)
    skip = {name for parts in kept.values() for name in parts} | set(kept_ends)
    if cpu_head and head_name == "output.weight":
        skip.add(head_name)

    def release_loading_memory() -> None:
        """What a decoded tensor's temporaries freed, and the file pages read for it, out of the resident set:
        glibc keeps freed memory for reuse and a read mapping stays resident, so without this a load's RSS grew
        with every tensor (the default model's load: +570 MB at its peak, +290 with this)."""
        release_free_memory()
        reader.release_pages()

    def keep_quantized(model: LlamaForCausalLM) -> None:
        if cpu_head:   # a head's rows are in HF order already (only attn_q / attn_k are permuted)
            planes = planes_weight_in_blocks(_row_blocks(head, int4_planes, release_loading_memory), compute_dtype)
            model.lm_head = QuantizedLinear(planes, None, head.tensor_type.name, compute_dtype)
        for name in kept_ends:   # rows in HF order already, as the CPU head's
            tensor = by_name[name]
            weight = affine_weight_in_blocks(_row_blocks(tensor, affine_codes, release_loading_memory),
                                             int(tensor.shape[1]), torch.device(device))
            label = tensor.tensor_type.name
            if name == "output.weight":
                model.lm_head = GpuQuantizedLinear([weight], label)
                continue
            model.embed_tokens = QuantizedEmbedding(weight, label, parse_dtype(dtype))
            if cfg.tie_word_embeddings:
                model.lm_head = GpuQuantizedLinear([weight], label)
        for (layer, projection), parts in kept.items():
            tensors = [by_name[name] for name in parts]
            owner, attr = projection.split(".")
            label = "/".join(dict.fromkeys(t.tensor_type.name for t in tensors))
            if gpu:
                codes = [_rows_in_hf_order(t, cfg, affine_codes) for t in tensors]
                module = GpuQuantizedLinear(affine_weight(codes, torch.device(device)), label)
            else:
                pieces = [_rows_in_hf_order(t, cfg, int4_planes) for t in tensors]
                module = QuantizedLinear(planes_weight(pieces, compute_dtype), None, label, compute_dtype)
            setattr(getattr(model.layers[layer], owner), attr, module)
            release_loading_memory()

    weights = with_progress(iter_gguf_weights(reader, cfg, where, skip), len(info.tensor_types) - len(skip),
                            "reading GGUF", progress)
    if weight_transform is not None:
        weights = ((name, weight_transform(name, t.load())) for name, t in weights)
    try:
        model = build_model(cfg, weights, dtype=dtype, device=device, max_positions=max_positions,
                            prepare=keep_quantized if kept or kept_ends or cpu_head else None)
    except ValueError as exc:
        raise ValueError(f"{where!r}: {exc}") from exc
    release_loading_memory()
    return model, cfg, info


def _row_blocks(tensor, read: Callable[[str, np.ndarray, int], Any], between: Callable[[], None]) -> Iterator[Any]:
    """A large GGUF tensor's rows decoded by `read` (`int4_planes` or `affine_codes`) `HEAD_BLOCK_ROWS` at a
    time, calling `between` after each block (the default model's Q8_0 head of 49,152 rows decoded at once
    took ~350 MB of temporaries; an 8B Q6_K head ~2 GB)."""
    k, rows = int(tensor.shape[0]), int(tensor.shape[1])
    for start in range(0, rows, HEAD_BLOCK_ROWS):
        yield read(tensor.tensor_type.name, tensor.data[start:start + HEAD_BLOCK_ROWS], k)
        between()


# The GGUF tensors behind each of gllm's fused projections, in the order their rows are stacked.
_PROJECTION_PARTS = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.down_proj": ("ffn_down",),
}


def kept_projections(by_name: dict, cfg: ModelConfig, keep_types: Collection[str],
                     gpu: bool = False) -> dict[tuple[int, str], list[str]]:
    """(layer, fused projection) -> its GGUF tensor names, for every projection whose parts are all stored in
    `keep_types` and whose blocks the kernels take (else it is dequantized like any other tensor): on the CPU
    the int4 kernel's packing constrains the shape, the GPU kernels take every block type as it is."""
    unknown = set(keep_types) - set(PLANE_TYPES)
    if unknown:
        raise ValueError(f"GGUF types {sorted(unknown)} cannot be kept quantized (only {', '.join(PLANE_TYPES)})")
    kept = {}
    for layer in range(cfg.num_hidden_layers):
        for projection in PROJECTIONS:
            if cfg.attention_bias if projection.startswith("self_attn") else cfg.mlp_bias:
                continue          # biased projections stay float (rare in Llama files; kept simple)
            names = [f"blk.{layer}.{part}.weight" for part in _PROJECTION_PARTS[projection]]
            tensors = [by_name.get(name) for name in names]
            if any(t is None or t.tensor_type.name not in keep_types for t in tensors):
                continue
            k = int(tensors[0].shape[0])                          # GGUF shapes are innermost first
            if gpu or all(check_int4_shape(int(t.shape[1]), k, 32) is None for t in tensors):
                kept[(layer, projection)] = names
    return kept


def _rows_in_hf_order(tensor, cfg: ModelConfig, read):
    """One GGUF tensor read by `read` (`int4_planes` or `affine_codes`), its rows in HF order (Q and K
    un-permuted as the float path does)."""
    k = int(tensor.shape[0])
    decoded = read(tensor.tensor_type.name, tensor.data, k)
    part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(part)
    if heads is None:
        return decoded
    return decoded.rows(unpermute_qk(np.arange(int(tensor.shape[1])), heads))

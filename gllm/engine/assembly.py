"""Assembling an engine's runtime from `GeneratorParams`: device, dtype, weights, KV pool, fast path,
scheduler, runner and sampler — everything the engine thread then drives. Decisions are made here once
and recorded (`dtype_reason`, `fast_path`); nothing downstream re-decides them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gllm.engine.device_dtype import auto_dtype
from gllm.engine.loading import LoadedModel, load
from gllm.engine.params import DEFAULT_CPU_KV_MB, GeneratorParams
from gllm.formats.gguf_quants import INT4_TYPES, PLANE_TYPES
from gllm.kv import BlockManager, KVCache, kv_bytes_per_token, num_blocks_for
from gllm.model import LlamaForCausalLM, ModelConfig, parse_dtype
from gllm.model.quantized import (
    GPU_ONLY_SCHEMES,
    QUANTIZED_LINEARS,
    SCHEMES,
    QuantConfig,
    head_formats,
    projection_formats,
    quantize_embeddings,
    quantize_layers,
    weight_bytes,
)
from gllm.runner import FastPath, ModelRunner, RunnerConfig, choose_fast_path
from gllm.sampling import Sampler
from gllm.scheduler import Scheduler, SchedulerConfig
from gllm.scheduler.step_cost import StepCostModel


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


def default_cpu_threads() -> int:
    # Leave cores to the game: half of those this process may run on, at most 8.
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(8, usable // 2))


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    cpu_threads: int
    loaded: LoadedModel
    kv_cache: KVCache
    block_manager: BlockManager
    cost_model: StepCostModel      # learns this device's step times (with step_budget_ms)
    scheduler: Scheduler
    fast_path: FastPath
    runner: ModelRunner
    sampler: Sampler
    weight_format: str             # the dtype, or "int4 (bfloat16 activations)" and the like
    weight_bytes: int


def assemble(model: str | Path | LoadedModel | None, gen: GeneratorParams, device: str | None,
             quiet: bool = True) -> Runtime:
    dev = pick_device(device)
    auto, dtype_reason = auto_dtype(dev)
    if gen.dtype != "auto":
        dtype_reason = "set by GeneratorParams.dtype"
    dtype = parse_dtype(auto if gen.dtype == "auto" else gen.dtype)
    quantize = gen.quantization in SCHEMES
    if quantize and dev.type not in ("cpu", "cuda"):
        raise ValueError(f"quantization={gen.quantization!r} runs on the CPU and on CUDA GPUs, not on {dev.type}")
    if gen.quantization in GPU_ONLY_SCHEMES and dev.type != "cuda":
        raise ValueError(f"quantization={gen.quantization!r} runs on CUDA GPUs (its kernels are the GPU's), not on "
                         f"{dev.type}; the CPU takes int8 or int4")
    # A GGUF's quantized blocks kept as they are: all of them by default, the 4-bit ones for int4 (the rest is
    # requantized from floats), none for "float" or int8. On a GPU without Triton they are dequantized.
    no_triton = dev.type == "cuda" and importlib.util.find_spec("triton") is None
    if quantize and no_triton:
        raise ValueError(f"quantization={gen.quantization!r} on a GPU needs Triton (its kernels); install triton "
                         f"or leave quantization unset")
    kernels_here = dev.type == "cpu" or (dev.type == "cuda" and not no_triton)
    keep = {None: PLANE_TYPES, "int4": INT4_TYPES, "q4_k_m": ("Q4_K", "Q6_K")}.get(gen.quantization, ()) \
        if kernels_here else ()
    loaded = model if isinstance(model, LoadedModel) else load(
        model, dtype=dtype, device=dev, max_positions=gen.max_seq_len, quiet=quiet, keep_gguf_types=keep)
    cfg: ModelConfig = loaded.config
    fallbacks = []
    if quantize:
        config = QuantConfig(gen.quantization, gen.quant_group_size)
        fallbacks = quantize_layers(loaded.model, config).fallbacks
        quantize_embeddings(loaded.model, config)   # on a GPU
    weight_format = describe_weights(loaded.model, dtype)
    if fallbacks:
        weight_format += f" ({len(fallbacks)} projections int8: their shapes do not pack as {gen.quantization})"
    if gen.max_seq_len > cfg.max_position_embeddings:
        raise ValueError(f"max_seq_len {gen.max_seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    num_blocks = _kv_blocks(gen, cfg, dtype, dev, loaded.model)
    block_manager = BlockManager(num_blocks, gen.block_size, gen.enable_prefix_caching)
    runner_config = RunnerConfig(block_size=gen.block_size, max_batch_size=gen.max_batch_size,
                                 max_step_tokens=gen.max_step_tokens,
                                 max_blocks_per_seq=block_manager.blocks_needed(gen.max_seq_len),
                                 cuda_graphs=gen.cuda_graphs, prefill_graph_tokens=gen.prefill_graph_tokens,
                                 dependent_launch=gen.dependent_launch,
                                 cpu_threads=gen.cpu_threads or default_cpu_threads())
    fast_path = choose_fast_path(dev, loaded.model, runner_config)
    kv_cache = KVCache(cfg, num_blocks, gen.block_size, dtype, dev, scratch_block=fast_path.decode_graphs)
    cost_model = StepCostModel()
    budget_s = None if gen.step_budget_ms is None else gen.step_budget_ms / 1000
    scheduler = Scheduler(SchedulerConfig(gen.max_batch_size, gen.max_step_tokens, budget_s,
                                          forced_step_decodes_all=dev.type == "cuda"), block_manager, cost_model)
    runner = ModelRunner(loaded.model, kv_cache, dev, fast_path, runner_config)
    return Runtime(device=dev, dtype=dtype, dtype_reason=dtype_reason,
                   cpu_threads=gen.cpu_threads or default_cpu_threads(), loaded=loaded, kv_cache=kv_cache,
                   block_manager=block_manager, cost_model=cost_model, scheduler=scheduler, fast_path=fast_path,
                   runner=runner, sampler=Sampler(cfg.vocab_size, dev), weight_format=weight_format,
                   weight_bytes=weight_bytes(loaded.model))


def describe_weights(model: LlamaForCausalLM, dtype: torch.dtype) -> str:
    """E.g. "float16", "int4 projections (bfloat16 products), float16 activations", "150 Q4_K + 30 Q4_K/Q6_K
    projections (GGUF blocks kept as they are) (bfloat16 products), float16 activations"."""
    name = str(dtype).removeprefix("torch.")
    formats = projection_formats(model)
    ends = head_formats(model)
    if not formats:
        return f"{name} ({ends})" if ends else name
    products = next(m.compute_dtype for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)) or dtype
    files = sum(n for label, n in formats.items() if label != label.lower())   # GGUF types: Q4_K, Q6_K, ...
    labels = " + ".join(f"{n} {label}" for label, n in formats.items()) if len(formats) > 1 or files \
        else next(iter(formats))
    return (f"{labels} projections{' (GGUF blocks kept as they are)' if files else ''} "
            f"({str(products).removeprefix('torch.')} products){', ' + ends if ends else ''}, {name} activations")


def _kv_blocks(gen: GeneratorParams, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               model: LlamaForCausalLM) -> int:
    if gen.gpu_memory_mb is not None:
        return num_blocks_for(cfg, dtype, gen.block_size, memory_mb=_kv_mb_within_budget(gen, cfg, dtype, device,
                                                                                          model))
    if gen.kv_cache_mb is not None:
        return num_blocks_for(cfg, dtype, gen.block_size, memory_mb=gen.kv_cache_mb)
    tokens = gen.kv_cache_tokens or _default_kv_tokens(gen, cfg, dtype, device)
    return num_blocks_for(cfg, dtype, gen.block_size, tokens=tokens)


def _default_kv_tokens(gen: GeneratorParams, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """Room for every batch row at full length; on the CPU at most DEFAULT_CPU_KV_MB of it (the game
    needs the RAM), but always one full-length request."""
    full = gen.max_batch_size * gen.max_seq_len
    if device.type != "cpu":
        return full
    budget = int(DEFAULT_CPU_KV_MB * 2**20) // kv_bytes_per_token(cfg, dtype)
    return max(gen.max_seq_len, min(full, budget))


def _kv_mb_within_budget(gen: GeneratorParams, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                         model: LlamaForCausalLM) -> float:
    """What `gpu_memory_mb` leaves for the KV pool after the weights and a step's activations."""
    weights = weight_bytes(model)
    element = torch.empty((), dtype=dtype).element_size()
    # Widest step: every token's hidden states, fused qkv and gate/up outputs (a few alive at once),
    # plus float32 logits and sampler copies for each sequence that samples, plus allocator slack.
    per_token = (4 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size + 3 * cfg.intermediate_size) * element
    activations = gen.max_step_tokens * per_token + gen.max_batch_size * cfg.vocab_size * 4 * 6
    if device.type == "cuda" and gen.cuda_graphs:   # the prefill graphs keep their activations
        activations += min(gen.max_step_tokens, gen.prefill_graph_tokens) * per_token
    reserve = activations + 512 * 2**20
    left = gen.gpu_memory_mb * 2**20 - weights - reserve
    if left <= 0:
        raise ValueError(f"gpu_memory_mb {gen.gpu_memory_mb:.0f} is too small: weights take "
                         f"{weights / 2**20:.0f} MiB and a step's activations about {reserve / 2**20:.0f} MiB")
    return left / 2**20

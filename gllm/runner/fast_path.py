"""The one place where the fast path is decided: which kernels and graphs a device runs, once, at setup.

`choose_fast_path` reads the device, the installed packages and the configuration, and returns a frozen
`FastPath`; the runner builds its graphs from it and the model takes its `kernels`. Nothing downstream
decides again (the attention kernels follow each step's typed plan, which the runner builds from it).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field

import torch

from gllm.model import LlamaForCausalLM
from gllm.model.kernels import PLAIN_KERNELS, ModelKernels

# float16 on the CPU: products of at least this many rows run in float32. torch's float16 matmul costs about
# a weight's conversion per row, float32 one conversion for all the rows; on the 2-core AVX2 VM with torch 2.13,
# float32 wins from 3-4 rows (1536 x 576 to 49152 x 576) and by 1.1-2.2x at 6 (session 9, older torch: from
# ~16). The default model's 8-row decode step 104 -> 99 ms (its head; docs/benchmarks.md, session 28).
CPU_UPCAST_ROWS = 6
# CPU steps of up to this many tokens run on one of the engine's threads: a small step is ~450 small operators,
# and waking the other threads (who wait without spinning) for each costs more than they add. Default model,
# 2-core AVX-512 machine, one thread against two: batch-1 decode 26.5 against 30.6 ms a step, batch 2 29.2
# against 32.4; even at 4 (37.1 / 36.4); two win from 8 (58.4 / 54.0) and in prefill (1.51 / 0.96 s for 512).
CPU_ONE_THREAD_TOKENS = 2
# A quantized head beside a float table (tied embeddings): from this many rows the float one (see ModelKernels).
CPU_FLOAT_HEAD_ROWS = 6
# torch's CPU attention (SDPA) is vectorised for float32: in float16 it took 2-5x the float32 time at every
# shape measured (one query row over 300 keys: 445-532 against 76-83 us, casts included; 512 over 512: 15-16
# against 7.2-7.4 ms), in bfloat16 3-4x for one query row and about the same for more (AVX2 and AVX-512
# kernels, 2 threads). So on the CPU attention casts to float32 and back (docs/benchmarks.md, session 17).

log = logging.getLogger("gllm.runner")


@dataclass(frozen=True)
class RunnerConfig:
    """What the runner needs of the engine's configuration (`GeneratorParams`)."""
    block_size: int
    max_batch_size: int
    max_step_tokens: int
    max_blocks_per_seq: int
    cuda_graphs: bool = True              # decode steps replayed from CUDA graphs (CUDA with Triton)
    prefill_graph_tokens: int = 0         # prefill steps up to this many tokens replayed from graphs (0: none)
    dependent_launch: bool | None = None  # None: on where the GPU has it (compute capability 9.0+)
    cpu_threads: int = 1                  # the engine's compute threads on the CPU


@dataclass(frozen=True)
class FastPath:
    triton: bool = False                  # Triton attention kernels in eager GPU steps
    decode_graphs: bool = False           # decode steps replayed from CUDA graphs
    prefill_graph_tokens: int = 0         # prefill steps of up to this many tokens replayed from graphs
    kernels: ModelKernels = PLAIN_KERNELS  # what the model's layers run
    notes: tuple[str, ...] = field(default=())   # why a part of the fast path is off
    one_thread_tokens: int = 0            # CPU: steps of up to this many tokens on one thread (see above)
    float32_attention: bool = False       # CPU: plain SDPA computes in float32 whatever the dtype (see above)

    def describe(self) -> str:
        if not self.triton:
            return "plain PyTorch" + (f", steps of ≤{self.one_thread_tokens} tokens on one thread"
                                      if self.one_thread_tokens else "")
        parts = ["Triton"]
        if self.decode_graphs:
            parts.append("decode graphs")
        if self.prefill_graph_tokens:
            parts.append(f"prefill graphs ≤{self.prefill_graph_tokens} tokens")
        if self.kernels.streamed_rows:
            parts.append(f"streamed GEMV ≤{self.kernels.streamed_rows} rows")
        if self.kernels.dependent_launch:
            parts.append("dependent launch")
        return ", ".join(parts)


def choose_fast_path(device: torch.device, model: LlamaForCausalLM, config: RunnerConfig) -> FastPath:
    if device.type != "cuda":
        if device.type != "cpu":
            return FastPath()
        one_thread = CPU_ONE_THREAD_TOKENS if config.cpu_threads > 1 else 0
        upcast = CPU_UPCAST_ROWS if next(model.parameters()).dtype == torch.float16 else 0
        return FastPath(kernels=ModelKernels(upcast_rows=upcast, float_head_rows=CPU_FLOAT_HEAD_ROWS),
                        one_thread_tokens=one_thread, float32_attention=True)
    if importlib.util.find_spec("triton") is None:
        return _off("Triton is not installed: the GPU runs the plain PyTorch path (no CUDA graphs, slower decode)")
    from gllm.ops import triton_gemv
    from gllm.ops.triton_attention import supports
    if not supports(config.block_size, model.cfg.head_dim):
        return _off(f"block_size {config.block_size} / head_dim {model.cfg.head_dim}: not powers of 2, so decode "
                    f"runs without the Triton kernel and CUDA graphs")
    notes: list[str] = []
    streamed = triton_gemv is not None and model.supports_streamed_kernels
    streamed_rows = 0 if not streamed else 1 if model.quantized_projections else triton_gemv.MAX_ROWS
    if streamed and model.quantized_projections:
        notes.append("quantized projections: one-row decode steps stream them with the norms and residual adds "
                     "folded in; wider steps run their GEMV or a dequantized matmul in the fused path")
    dependent = streamed and _dependent_launch(config.dependent_launch, device, notes)
    kernels = ModelKernels(fused=True, streamed_rows=streamed_rows, dependent_launch=dependent)
    graphs = config.cuda_graphs
    prefill_tokens = min(config.max_step_tokens, config.prefill_graph_tokens) if graphs else 0
    return FastPath(triton=True, decode_graphs=graphs, prefill_graph_tokens=prefill_tokens, kernels=kernels,
                    notes=tuple(notes))


def _off(reason: str) -> FastPath:
    log.warning(reason)
    return FastPath(notes=(reason,))


def _dependent_launch(wanted: bool | None, device: torch.device, notes: list[str]) -> bool:
    """Whether decode kernels use programmatic dependent launch: asked for (or left to us) and the GPU has it."""
    if wanted is False:
        return False
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        if wanted:
            notes.append(f"dependent_launch needs compute capability 9.0 or later; this GPU is {major}.{minor}")
            log.warning(notes[-1])
        return False
    return True

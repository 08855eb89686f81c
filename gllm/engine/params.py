"""`GeneratorParams`: how the engine is sized — batch, sequence length, KV cache, step budget."""

from __future__ import annotations

from dataclasses import dataclass

from gllm.model.quantized import QuantConfig

# The default KV pool on the CPU: at most this much (and at least one max_seq_len request). Its pages are
# mapped as blocks are first used, so a light load takes far less.
DEFAULT_CPU_KV_MB = 256
# The compute_nice of a server's engine (`gllm serve`, `python -m gllm.bridge|http`) unless --compute-nice
# says otherwise: the game beside it comes first.
SERVER_COMPUTE_NICE = 10


@dataclass(frozen=True)
class GeneratorParams:
    block_size: int = 16               # tokens per KV block
    max_batch_size: int = 8            # sequences decoding at once
    max_seq_len: int = 2048            # prompt + output tokens of one request
    max_step_tokens: int = 512         # tokens computed per engine step (prefill is chunked to fit)
    # A time budget per step: prefill chunks are sized so the step's predicted time (a cost model fitted to
    # this device's measured steps) fits; decodes always get their token. None: the token budget alone.
    step_budget_ms: float | None = None
    kv_cache_tokens: int | None = None  # KV capacity in tokens; default max_batch_size * max_seq_len
                                       # (on the CPU at most DEFAULT_CPU_KV_MB, at least max_seq_len)
    kv_cache_mb: float | None = None   # or a memory budget for the KV cache, in MiB
    gpu_memory_mb: float | None = None  # or a budget for everything on the GPU (weights + activations + KV)
    enable_prefix_caching: bool = True
    # Raw `prompt` text: special-token strings in it become control tokens (True, for hand-written prompts),
    # or stay plain text (False). Chat messages are always plain text: the template writes the control tokens.
    prompt_special_tokens: bool = True
    dtype: str = "auto"                # "auto" (see gllm/engine/device_dtype.py), "float32", "bfloat16", "float16"
    cpu_threads: int | None = None     # torch threads for CPU inference; default half the cores (max 8)
    # Threads computing a step's structured-output masks; default 1 on the CPU (the model's threads are busy),
    # half the usable cores up to 8 beside a GPU.
    grammar_threads: int | None = None
    # Raise the engine's compute threads' nice value by this (Linux; below-normal priority on Windows), so the
    # game's threads win when cores are short. 0: the caller's priority. Servers use SERVER_COMPUTE_NICE.
    compute_nice: int = 0
    # Or the OS's idle scheduling class (Linux SCHED_IDLE, Windows idle priority): the engine computes only on
    # cores no other thread wants, whatever compute_nice says.
    compute_idle: bool = False
    # On the CPU, a step inside a game's idle windows (`LLMEngine.report_idle`) pauses between decoder layers
    # when the window would close before the next layer ends, and goes on in the next window.
    layer_pauses: bool = True
    max_waiting_requests: int = 4096   # queued requests beyond which new ones are refused
    cuda_graphs: bool = True           # on CUDA with Triton: decode steps replayed from CUDA graphs
    prefill_graph_tokens: int = 2048   # and prefill-only steps up to this many tokens (0: prefill stays eager)
    overlap_steps: bool | None = None  # detokenize/deliver step N while step N+1 runs; None: on for CUDA
    # With overlap on CUDA: a step queued ahead with at least this many constrained rows samples behind a stream
    # gate that its mask thread opens, so the masks are computed beside the engine thread (on an H200, batch 1:
    # +0.6 % a step gated against +3-5 % not; docs/benchmarks.md). 0: never; the masks are computed, then sampled.
    mask_gate_rows: int = 1
    # Decode kernels start while the one before them finishes (programmatic dependent launch: compute
    # capability 9.0+, i.e. Hopper and later); None: on where the GPU has it. False turns it off.
    dependent_launch: bool | None = None
    # The decoder layers' projections. None: as the source stores them (a GGUF's quantized blocks kept as they
    # are, on the CPU and on a GPU with Triton; floats in `dtype` otherwise). "float": dequantized to `dtype`.
    # Weight-only quantization on load: "int8" (per output channel on the CPU, groups of 128 on a GPU) or
    # "int4" (asymmetric, in groups of quant_group_size along K; a GGUF's 4-bit blocks are kept as they are);
    # on a GPU also "q4_k_m" (llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the head and some layers' v and down).
    quantization: str | None = None
    quant_group_size: int = 32
    # NPC memory (issue #23): results of deterministic requests kept for repeats (0 entries = off).
    result_cache_entries: int = 512
    result_cache_mb: float = 16.0

    def __post_init__(self) -> None:
        for name in ("block_size", "max_batch_size", "max_seq_len", "max_step_tokens", "max_waiting_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if sum(x is not None for x in (self.kv_cache_tokens, self.kv_cache_mb, self.gpu_memory_mb)) > 1:
            raise ValueError("give at most one of kv_cache_tokens, kv_cache_mb, gpu_memory_mb")
        if self.gpu_memory_mb is not None and not self.gpu_memory_mb > 0:
            raise ValueError(f"gpu_memory_mb must be > 0, got {self.gpu_memory_mb!r}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens must be >= block_size ({self.block_size}), got {self.kv_cache_tokens}")
        if self.kv_cache_mb is not None and not self.kv_cache_mb > 0:
            raise ValueError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb!r}")
        if not isinstance(self.prefill_graph_tokens, int) or self.prefill_graph_tokens < 0:
            raise ValueError(f"prefill_graph_tokens must be an integer >= 0, got {self.prefill_graph_tokens!r}")
        if self.step_budget_ms is not None and not (isinstance(self.step_budget_ms, (int, float))
                                                    and self.step_budget_ms > 0):
            raise ValueError(f"step_budget_ms must be > 0 (or None), got {self.step_budget_ms!r}")
        if not isinstance(self.layer_pauses, bool):
            raise ValueError(f"layer_pauses must be True or False, got {self.layer_pauses!r}")
        if not isinstance(self.compute_idle, bool):
            raise ValueError(f"compute_idle must be True or False, got {self.compute_idle!r}")
        if not isinstance(self.compute_nice, int) or not 0 <= self.compute_nice <= 19:
            raise ValueError(f"compute_nice must be an integer in [0, 19], got {self.compute_nice!r}")
        if not isinstance(self.mask_gate_rows, int) or self.mask_gate_rows < 0:
            raise ValueError(f"mask_gate_rows must be an integer >= 0, got {self.mask_gate_rows!r}")
        if not isinstance(self.result_cache_entries, int) or self.result_cache_entries < 0:
            raise ValueError(f"result_cache_entries must be an integer >= 0, got {self.result_cache_entries!r}")
        if not (isinstance(self.result_cache_mb, (int, float)) and self.result_cache_mb >= 0):
            raise ValueError(f"result_cache_mb must be >= 0, got {self.result_cache_mb!r}")
        for name in ("cpu_threads", "grammar_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.quantization not in (None, "float"):
            QuantConfig(self.quantization, self.quant_group_size)   # raises ValueError naming what is wrong

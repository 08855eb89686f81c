"""`dtype="auto"`: bfloat16 where the CPU computes it natively, float32 elsewhere; the engine says which and why."""

from __future__ import annotations

import torch

from gllm.engine import GeneratorParams, LLMEngine
from gllm.engine.device_dtype import auto_dtype, cpu_bf16_flags

X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_the_choice_follows_the_cpu_flags():
    cpu = torch.device("cpu")
    assert cpu_bf16_flags(X86_PLAIN) == [] and auto_dtype(cpu, X86_PLAIN)[0] == "float32"
    assert cpu_bf16_flags(X86_BF16) == ["amx_bf16", "avx512_bf16"]
    assert auto_dtype(cpu, X86_BF16) == ("bfloat16", "CPU computes bfloat16 natively (amx_bf16, avx512_bf16)")
    assert auto_dtype(cpu, ARM_BF16)[0] == "bfloat16"
    assert auto_dtype(cpu, "")[0] == "float32"
    assert auto_dtype(torch.device("cuda"))[0] == "bfloat16"


def test_the_engine_makes_the_choice_for_this_machine_and_reports_it(llama32_dir):
    expected, why = auto_dtype(torch.device("cpu"))
    with LLMEngine(llama32_dir, GeneratorParams(max_seq_len=128, max_batch_size=1, cpu_threads=1), device="cpu") as eng:
        assert eng.dtype == getattr(torch, expected) and eng.dtype_reason == why
        assert next(eng.model.parameters()).dtype == eng.dtype
        assert eng.kv_cache.layers[0][0].dtype == eng.dtype
    with LLMEngine(llama32_dir, GeneratorParams(max_seq_len=128, max_batch_size=1, cpu_threads=1, dtype="float32"),
                   device="cpu") as eng:
        assert eng.dtype == torch.float32 and "GeneratorParams" in eng.dtype_reason

"""`dtype="auto"`: bfloat16 where the CPU computes it natively, float16 where it converts float16 in hardware,
float32 elsewhere; the engine makes the choice for this machine and says which and why."""

from __future__ import annotations

import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.engine.device_dtype import auto_dtype, cpu_flags

X86_OLD = "processor\t: 0\nflags\t\t: fpu sse2 sse4_2\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx f16c avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 f16c avx512f avx512_bf16 amx_tile amx_bf16\n"
ARM_FP16 = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd asimdhp sve bf16 i8mm\n"
CPU = torch.device("cpu")


def test_the_choice_follows_the_cpu_flags():
    assert cpu_flags(X86_AVX2) >= {"avx2", "f16c"}
    assert auto_dtype(CPU, X86_OLD)[0] == "float32"
    assert auto_dtype(CPU, X86_AVX2) == ("float16", "the CPU converts float16 in hardware (avx2, f16c) and has no "
                                                    "native bfloat16")
    assert auto_dtype(CPU, X86_BF16) == ("bfloat16", "the CPU computes bfloat16 natively (amx_bf16, avx512_bf16)")
    assert auto_dtype(CPU, ARM_FP16)[0] == "float16" and auto_dtype(CPU, ARM_BF16)[0] == "bfloat16"
    assert auto_dtype(CPU, "")[0] == "float32"
    assert auto_dtype(torch.device("cuda"))[0] == "bfloat16"


def test_the_engine_makes_the_choice_for_this_machine_and_reports_it(llama32_dir):
    expected, why = auto_dtype(CPU)
    with LLMEngine(llama32_dir, GeneratorParams(max_seq_len=128, max_batch_size=1, cpu_threads=1), device="cpu") as eng:
        assert eng.dtype == getattr(torch, expected) and eng.dtype_reason == why
        assert next(eng.model.parameters()).dtype == eng.dtype
        assert eng.kv_cache.layers[0][0].dtype == eng.dtype
        assert eng.generate([GenerationRequest(
            prompt="Hello", max_new_tokens=4, temperature=0)])[0].finish_reason == "length"
    with LLMEngine(llama32_dir, GeneratorParams(max_seq_len=128, max_batch_size=1, cpu_threads=1, dtype="float32"),
                   device="cpu") as eng:
        assert eng.dtype == torch.float32 and "GeneratorParams" in eng.dtype_reason

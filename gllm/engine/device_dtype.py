"""What `dtype="auto"` means on this machine.

- GPU: bfloat16.
- CPUs that compute bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16): bfloat16. On a 2-core
  AVX512-BF16 machine it gave 3x the prefill and 1.3x the decode of float32 on SmolLM2-135M.
- CPUs that convert float16 in hardware (x86 F16C with AVX2, Arm FP16 arithmetic): float16 weights and
  activations. On a 2-core AVX2 machine: 1.07x the prefill and 1.31x the decode of float32, half the weight
  memory, and the same greedy text (logprobs within 0.01); bfloat16 there was slower to prefill and 13x less
  accurate. Figures and commands: docs/benchmarks.md.
- Other CPUs: float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

# /proc/cpuinfo flags (x86 "flags", Arm "Features").
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
X86_FP16_FLAGS = frozenset({"avx2", "f16c"})      # both needed
ARM_FP16_FLAGS = frozenset({"asimdhp"})


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where the OS does not say)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def auto_dtype(device: torch.device, cpuinfo: str | None = None) -> tuple[str, str]:
    """(dtype name, why) for `dtype="auto"` on `device`."""
    if device.type != "cpu":
        return "bfloat16", f"{device.type}: bfloat16"
    flags = cpu_flags(cpuinfo)
    if flags & NATIVE_BF16_FLAGS:
        return "bfloat16", f"the CPU computes bfloat16 natively ({', '.join(sorted(flags & NATIVE_BF16_FLAGS))})"
    if X86_FP16_FLAGS <= flags or flags & ARM_FP16_FLAGS:
        have = sorted(flags & (X86_FP16_FLAGS | ARM_FP16_FLAGS))
        return "float16", f"the CPU converts float16 in hardware ({', '.join(have)}) and has no native bfloat16"
    return "float32", "the CPU has neither native bfloat16 nor float16 conversion"

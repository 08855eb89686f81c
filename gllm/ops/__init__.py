"""Kernels behind the model: attention over the paged KV cache.

`paged_attention` is the seam for fast GPU kernels (a later issue); the plain PyTorch path
runs everywhere.
"""

from gllm.ops.attention import paged_attention, write_kv

__all__ = ["paged_attention", "write_kv"]

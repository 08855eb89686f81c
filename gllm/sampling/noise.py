"""Seeded sampling noise that depends only on (seed, step, token id).

Each request's randomness comes from a counter-based hash, not from a shared generator, so a
request samples the same tokens alone or in any batch, after a preemption, on CPU or GPU, and
the whole batch's noise is one vectorized computation with no host round trip.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 without overflowing int64: split c into 16-bit halves.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finalizer on int64 tensors holding 32-bit values: a bijection with full avalanche."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def row_key(seed: int, step: int) -> int:
    """A 32-bit key for the `step`-th token a request with `seed` samples."""
    k = fmix32_int((seed & _MASK32) ^ fmix32_int((seed >> 32) & _MASK32))
    return fmix32_int(k ^ fmix32_int((step * _GOLDEN) & _MASK32))


class NoiseTable:
    """Holds the per-token-id half of the hash for one vocabulary size and device."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        ids = torch.arange(vocab_size, dtype=torch.int64, device=device)
        self.token_hash = fmix32(_mul32(ids, _GOLDEN))

    def exponential(self, keys: torch.Tensor) -> torch.Tensor:
        """[B] int64 keys -> [B, V] float32 Exp(1) draws."""
        return _exponential(fmix32(self.token_hash[None, :] ^ keys[:, None]))

    def exponential_at(self, keys: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The same draws as `exponential(keys)[rows, token_ids]`, computed only there."""
        return _exponential(fmix32(self.token_hash[token_ids] ^ keys[rows]))


def _exponential(h: torch.Tensor) -> torch.Tensor:
    # 23 bits so that k + 0.5 is exact in float32: uniform stays strictly inside (0, 1).
    uniform = ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(uniform)


# log(E) for E = -log(u), u in [2**-24, 1 - 2**-24], lies in about [-16.6, 2.8]: a token whose
# logit trails the row's best by more than this can never win the race argmax(logit - log E).
RACE_MARGIN = 20.0

"""Small numpy encoders for GGUF's K-quant blocks (Q4_K, Q5_K, Q6_K), which the `gguf` package can read but not
write: for test files and benchmark models. Plain min-max per sub-block with the sub-block scales rounded to
the format's 6 or 8 bits — a valid encoding, not llama.cpp's search for the best one (its error is somewhat
larger). The reference for what the bytes mean stays `gguf.quants.dequantize`.

    encode(weights float32 [rows, k], "Q4_K") -> uint8 [rows, k / 256 * block bytes]
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _scale_min_k(w: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: w [n, 8, 32] -> (d, dmin [n], sc, m uint8 [n, 8], q uint8 [n, 8, 32]) with
    w ~ d sc q - dmin m."""
    lo = np.minimum(w.min(-1), 0.0)                  # the format's offset is subtracted: min <= 0
    span = (w.max(-1) - lo) / levels
    d = (span.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (-lo.min(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(span, d[:, None])), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(-lo, dmin[:, None])), 0, 63).astype(np.uint8)
    step = d[:, None] * sc
    q = np.rint(_safe_div(w + (dmin[:, None] * m)[..., None], np.broadcast_to(step[..., None], w.shape)))
    return d, dmin, sc, m, np.clip(q, 0, levels).astype(np.uint8)


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> 12 bytes (sub-blocks 4-7 split into nibbles + top 2 bits)."""
    a = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    b = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([a, b, c], axis=-1).astype(np.uint8)


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 8, 32] values -> 128 bytes: byte 32 c + i holds sub-block 2c (low nibble) and 2c + 1 (high)."""
    pairs = (q & 0x0F).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def _q4_k(w: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_k(w.reshape(-1, 8, 32), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), _low_nibbles(q)], axis=-1)


def _q5_k(w: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scale_min_k(w.reshape(-1, 8, 32), 31)
    high = ((q >> 4) << np.arange(8, dtype=np.uint8)[:, None]).sum(1).astype(np.uint8)   # bit j: sub-block j
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_scales(sc, m), high, _low_nibbles(q)], axis=-1)


def _q6_k(w: np.ndarray) -> np.ndarray:
    w = w.reshape(-1, 16, 16)
    scale = np.abs(w).max(-1) / 31                                # q - 32 in [-32, 31]
    d = (np.abs(scale).max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127).astype(np.int8)
    step = np.broadcast_to((d[:, None] * sc)[..., None], w.shape)
    q = (np.clip(np.rint(_safe_div(w, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # [h, s, i]
    low = q & 0x0F
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)   # byte 64 h + 32 (s % 2) + i, nibble s // 2
    qh = ((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(2).astype(np.uint8).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _f16_bytes(d)], axis=-1)


_ENCODERS = {"Q4_K": (_q4_k, 144), "Q5_K": (_q5_k, 176), "Q6_K": (_q6_k, 210)}
TYPES = tuple(_ENCODERS)


def encode(w: np.ndarray, type_name: str) -> np.ndarray:
    encoder, size = _ENCODERS[type_name]
    rows, k = w.shape
    if k % QK_K:
        raise ValueError(f"{type_name}: rows of {k} weights are not whole {QK_K}-weight super-blocks")
    blocks = encoder(np.asarray(w, dtype=np.float32).reshape(-1, QK_K))
    return blocks.reshape(rows, k // QK_K * size)

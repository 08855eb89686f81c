"""GGUF's 4-bit blocks read as they are: each 32-weight block's 4-bit values, its scale and its offset.

    Q4_0 block (18 bytes): d (float16), 16 bytes of nibbles;        w = d * (q - 8)
    Q4_1 block (20 bytes): d (float16), m (float16), 16 bytes;      w = d * q + m

Nibble j of a block's byte i: the low nibbles are weights 0-15, the high ones 16-31. Both forms are
`group_min + scale * q` with q in [0, 15] — the int4 form the quantized kernels take, so these blocks need
no requantization (only their float16 scales widen). Other types are not of that form.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32
_LAYOUT = {"Q4_0": (18, False), "Q4_1": (20, True)}    # bytes a block, whether it stores an offset
INT4_TYPES = tuple(_LAYOUT)


def int4_groups(type_name: str, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tensor's rows (`data`: [rows, bytes] uint8 as the GGUF reader gives them, `k` weights a row) as
    (q uint8 [rows, k] in 0..15, scale float32 [rows, k / 32], group_min float32 [rows, k / 32])."""
    if type_name not in _LAYOUT:
        raise ValueError(f"{type_name} blocks are not 4-bit affine (only {', '.join(INT4_TYPES)} are)")
    size, has_offset = _LAYOUT[type_name]
    rows = data.shape[0]
    if k % BLOCK or data.shape[1] != k // BLOCK * size:
        raise ValueError(f"{type_name}: {data.shape[1]} bytes a row do not hold {k} weights")
    blocks = np.ascontiguousarray(data).reshape(rows, k // BLOCK, size)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if has_offset:
        group_min = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        nibbles = blocks[..., 4:]
    else:
        group_min = -8.0 * scale
        nibbles = blocks[..., 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(rows, k)
    return q, scale, group_min

"""KV session snapshots: a conversation's KV, exported from the block pools into a versioned, identity-tagged
blob (for the save game) and written back into fresh blocks of the prefix cache.

Layout (all integers little-endian):
    b"GLLMSNAP" | u32 header length | header (UTF-8 JSON, sorted keys) | token ids (i32 x tokens)
    | payload | SHA-256 of everything before it (32 bytes)
The payload holds, layer by layer, K then V for every token as [tokens, kv_heads, head_dim]: the cache's
own bytes ("raw"), or ("int8") one scale byte per token and head followed by the int8 values. The scale is a
power of 2**(1/4) (byte e stands for 2**((e - 160) / 4), 2**-40 to 2**23.75), the least one at or above
absmax / 127 of the head vector, so each value is off by at most scale / 2 <= 1.19 x absmax / 254 (0.47 % of
the vector's largest value); one byte instead of a float16 keeps small heads (head_dim 16) under 0.55 x a
float16 cache.
KV is stored per token, not per block, so a snapshot restores into any block size.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gllm.kv.cache import KVCache
from gllm.kv.slots import slots_of

MAGIC = b"GLLMSNAP"
FORMAT_VERSION = 1
ENCODINGS = ("raw", "int8")
_DIGEST = 32
_MAX_HEADER = 64 * 1024
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SnapshotError(ValueError):
    """A snapshot blob this engine cannot restore. `code` is what front ends report; `reason` says which kind."""
    code = "bad_request"
    reason = "invalid"
    field = "snapshot"


class SnapshotMismatch(SnapshotError):
    """A well-formed snapshot of another model, tokenizer, dtype or KV shape."""
    reason = "mismatch"


class SnapshotCorrupt(SnapshotError):
    """Not a snapshot, or its bytes changed (the checksum does not match)."""
    reason = "corrupt"


class SnapshotTruncated(SnapshotError):
    """Shorter than its header says."""
    reason = "truncated"


class SnapshotTooLarge(SnapshotError):
    """More bytes or tokens than allowed, or more blocks than the pool has free."""
    code = "too_long"
    reason = "too_large"


@dataclass(frozen=True)
class SnapshotIdentity:
    """What a snapshot must match to be restored: the model's weights, the tokenizer + chat template, the KV
    cache's dtype and shape."""
    model: str
    tokenizer: str
    dtype: str
    layers: int
    kv_heads: int
    head_dim: int

    def header(self) -> dict:
        return {"model": self.model, "tokenizer": self.tokenizer, "dtype": self.dtype, "layers": self.layers,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim}


@dataclass
class Int8Kv:
    """One int8-encoded K or V: values [tokens, kv_heads, head_dim] and scale exponents [tokens, kv_heads]. It is
    dequantized where it is written (on the GPU for a GPU pool), and only for the blocks restored."""
    q: torch.Tensor
    exponent: torch.Tensor

    def rows(self, positions: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        q = self.q[positions].to(device)
        scale = torch.exp2((self.exponent[positions].to(device).float() - 160) / 4)
        return (q.float() * scale.unsqueeze(-1)).to(dtype)

    def dense(self) -> torch.Tensor:
        return self.rows(torch.arange(self.q.shape[0]), self.q.device, torch.float32)


@dataclass
class Snapshot:
    """A decoded snapshot: the token ids and per layer (K, V), each [tokens, kv_heads, head_dim] (`Int8Kv` for
    the int8 encoding)."""
    token_ids: list[int]
    layers: list[tuple[torch.Tensor | Int8Kv, torch.Tensor | Int8Kv]]
    encoding: str
    block_size: int


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_kv(cache: KVCache, block_ids: Sequence[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K and V of a sequence's first `num_tokens` positions, per layer (copies, on the pool's device: `encode`
    quantizes there and copies the bytes to the host)."""
    slots = torch.tensor(slots_of(list(block_ids), 0, num_tokens, cache.block_size), dtype=torch.int64)
    out = []
    for k, v in cache.layers:
        index = slots.to(k.device)
        out.append(tuple(t.view(-1, *t.shape[2:])[index] for t in (k, v)))
    return out


def write_kv(cache: KVCache, blocks: Sequence[tuple[int, int]], snap: Snapshot) -> None:
    """Write the snapshot's tokens of block index i (in `cache.block_size` blocks) into pool block b, for each
    (i, b) of `blocks`."""
    if not blocks:
        return
    bs = cache.block_size
    positions = torch.tensor([i * bs + j for i, _ in blocks for j in range(bs)], dtype=torch.int64)
    slots = torch.tensor([b * bs + j for _, b in blocks for j in range(bs)], dtype=torch.int64)
    for (k, v), (sk, sv) in zip(cache.layers, snap.layers):
        index = slots.to(k.device)
        for pool, src in ((k, sk), (v, sv)):
            rows = src.rows(positions, pool.device, pool.dtype) if isinstance(src, Int8Kv) else \
                src[positions].to(device=pool.device, dtype=pool.dtype)
            pool.view(-1, *pool.shape[2:])[index] = rows


def encode(identity: SnapshotIdentity, token_ids: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]],
           block_size: int, encoding: str = "raw") -> bytes:
    """The blob of `token_ids` and their KV (as `read_kv` returns it)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"snapshot encoding must be one of {ENCODINGS}, got {encoding!r}")
    header = {**identity.header(), "format": FORMAT_VERSION, "encoding": encoding, "tokens": len(token_ids),
              "block_size": block_size}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head, np.asarray(token_ids, dtype="<i4").tobytes()]
    for pair in layers:
        for t in pair:
            parts.extend(_encode_tensor(t, encoding))
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def _encode_tensor(t: torch.Tensor, encoding: str) -> list[bytes]:
    if encoding == "raw":
        return [_raw_bytes(t)]
    x = t.float()
    exponent = torch.ceil(4 * torch.log2(x.abs().amax(dim=-1).clamp_min(1e-30) / 127)).clamp(-160, 95)
    q = torch.round(x / torch.exp2(exponent / 4).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return [_raw_bytes((exponent + 160).to(torch.uint8)), _raw_bytes(q)]


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()


def expected_size(header: dict, head_len: int) -> int:
    n, layers, heads, dim = header["tokens"], header["layers"], header["kv_heads"], header["head_dim"]
    if header["encoding"] == "raw":
        per_tensor = n * heads * dim * torch.empty((), dtype=_DTYPES[header["dtype"]]).element_size()
    else:
        per_tensor = n * heads * (1 + dim)
    return len(MAGIC) + 4 + head_len + 4 * n + 2 * layers * per_tensor + _DIGEST


def read_header(blob: bytes) -> tuple[dict, int]:
    """The header and its length; `SnapshotCorrupt` if the blob is no snapshot, `SnapshotTruncated` if it ends
    inside the header."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotCorrupt(f"a snapshot is bytes, got {type(blob).__name__}")
    blob = bytes(blob[: len(MAGIC) + 4 + _MAX_HEADER])
    if len(blob) < len(MAGIC) + 4:
        if MAGIC.startswith(blob[: len(MAGIC)]) and blob:
            raise SnapshotTruncated(f"snapshot truncated: {len(blob)} bytes")
        raise SnapshotCorrupt("not a gllm snapshot (too short)")
    if blob[: len(MAGIC)] != MAGIC:
        raise SnapshotCorrupt("not a gllm snapshot (bad magic bytes)")
    (head_len,) = struct.unpack_from("<I", blob, len(MAGIC))
    if head_len > _MAX_HEADER:
        raise SnapshotCorrupt(f"snapshot header of {head_len} bytes (at most {_MAX_HEADER})")
    start = len(MAGIC) + 4
    if len(blob) < start + head_len:
        raise SnapshotTruncated(f"snapshot truncated inside its header ({len(blob)} bytes)")
    try:
        header = json.loads(blob[start:start + head_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotCorrupt(f"snapshot header is not valid JSON: {exc}") from None
    _check_header(header)
    return header, head_len


def _check_header(header: object) -> None:
    if not isinstance(header, dict):
        raise SnapshotCorrupt("snapshot header is not a JSON object")
    if header.get("format") != FORMAT_VERSION:
        raise SnapshotMismatch(f"snapshot format {header.get('format')!r}; this gllm reads format {FORMAT_VERSION}")
    for key in ("tokens", "layers", "kv_heads", "head_dim", "block_size"):
        value = header.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > 2**40:
            raise SnapshotCorrupt(f"snapshot header field {key!r} is {value!r}")
    if header.get("encoding") not in ENCODINGS or header.get("dtype") not in _DTYPES:
        raise SnapshotCorrupt(f"snapshot encoding/dtype {header.get('encoding')!r}/{header.get('dtype')!r} unknown")
    for key in ("model", "tokenizer"):
        if not isinstance(header.get(key), str):
            raise SnapshotCorrupt(f"snapshot header field {key!r} is missing")


def decode(blob: bytes, identity: SnapshotIdentity, *, max_tokens: int, max_bytes: int | None = None) -> Snapshot:
    """Check and decode a blob for an engine of `identity`. Typed errors (`SnapshotError`) for anything else:
    another model/tokenizer/dtype, a changed byte, a short blob, more than `max_tokens` tokens or `max_bytes`."""
    if max_bytes is not None and isinstance(blob, (bytes, bytearray, memoryview)) and len(blob) > max_bytes:
        raise SnapshotTooLarge(f"snapshot of {len(blob)} bytes; at most {max_bytes}")
    header, head_len = read_header(blob)
    if header["tokens"] > max_tokens:
        raise SnapshotTooLarge(f"snapshot holds {header['tokens']} tokens; this engine takes at most {max_tokens}")
    size = expected_size(header, head_len)
    if len(blob) < size:
        raise SnapshotTruncated(f"snapshot truncated: {len(blob)} of {size} bytes")
    if len(blob) > size:
        raise SnapshotCorrupt(f"snapshot has {len(blob) - size} bytes after its end")
    view = memoryview(blob)
    if hashlib.sha256(view[: size - _DIGEST]).digest() != bytes(view[size - _DIGEST:]):
        raise SnapshotCorrupt("snapshot checksum mismatch: the blob was changed or damaged")
    for key, want in identity.header().items():
        if header[key] != want:
            what = {"model": "another model's weights", "tokenizer": "another tokenizer or chat template"}.get(
                key, f"{key} {header[key]!r} (this engine: {want!r})")
            raise SnapshotMismatch(f"snapshot is of {what}; it cannot be restored into this engine")
    n, heads, dim = header["tokens"], header["kv_heads"], header["head_dim"]
    offset = len(MAGIC) + 4 + head_len
    token_ids = np.frombuffer(view, dtype="<i4", count=n, offset=offset).astype(np.int64).tolist()
    offset += 4 * n
    dtype = _DTYPES[header["dtype"]]
    layers = []
    for _ in range(header["layers"]):
        pair = []
        for _kv in range(2):
            tensor, offset = _decode_tensor(view, offset, header["encoding"], dtype, (n, heads, dim))
            pair.append(tensor)
        layers.append((pair[0], pair[1]))
    return Snapshot(token_ids, layers, header["encoding"], header["block_size"])


def _decode_tensor(view: memoryview, offset: int, encoding: str, dtype: torch.dtype,
                   shape: tuple[int, int, int]) -> tuple[torch.Tensor | Int8Kv, int]:
    n, heads, dim = shape
    if encoding == "raw":
        size = n * heads * dim * torch.empty((), dtype=dtype).element_size()
        return _bytes_tensor(view[offset:offset + size]).view(dtype).view(shape), offset + size
    scale_size, q_size = n * heads, n * heads * dim
    exponent = _bytes_tensor(view[offset:offset + scale_size]).view(n, heads)
    q = _bytes_tensor(view[offset + scale_size:offset + scale_size + q_size]).view(torch.int8).view(shape)
    return Int8Kv(q, exponent), offset + scale_size + q_size


def _bytes_tensor(data: memoryview) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)

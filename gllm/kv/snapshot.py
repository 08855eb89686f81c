"""KV session snapshots: a conversation's KV, exported from the block pools into a versioned, identity-tagged
blob (for the save game) and written back into fresh blocks of the prefix cache.

Layout (all integers little-endian):
    b"GLLMSNAP" | u32 header length | header (UTF-8 JSON, sorted keys, space-padded) | token ids (i32 x tokens)
    | payload | SHA-256 of everything before the payload (32 bytes) | u64 checksum of the payload
The header is padded so the payload starts at a multiple of 8 bytes. The payload holds, layer by layer, K then V
for every token as [tokens, kv_heads, head_dim]: the cache's own bytes ("raw"), or ("int8") one scale byte per
token and head followed by the int8 values. The scale is a power of 2**(1/4) (byte e stands for
2**((e - 160) / 4), 2**-40 to 2**23.75), the least one at or above absmax / 127 of the head vector, so each value
is off by at most scale / 2 <= 1.19 x absmax / 254 (0.47 % of the vector's largest value); one byte instead of a
float16 keeps small heads (head_dim 16) under 0.55 x a float16 cache.
The payload's checksum is computed where the KV lives (on the GPU for a GPU pool): the payload, zero-padded to
8 bytes, read as int64 words w_i, gives sum((2i + 1) * w_i) mod 2**64. An odd weight makes any change to one word
change the sum, and it costs a tenth of a millisecond on the device for what SHA-256 takes ~60 ms to read on the
host (65 MB, a 2,000-token 1B-shape history); the small header and ids keep SHA-256.
KV is stored per token, not per block, so a snapshot restores into any block size.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from gllm.kv.cache import KVCache
from gllm.kv.slots import slots_of

MAGIC = b"GLLMSNAP"
FORMAT_VERSION = 2
ENCODINGS = ("raw", "int8")
_DIGEST = 32                      # SHA-256 of the header and token ids
_TRAILER = _DIGEST + 8            # ... and the payload's checksum
_CHECKSUM_WORDS = 1 << 20         # words summed at a time (bounds the temporaries: 8 MiB of int64)
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
    """The int8-encoded K and V of every layer: values [2 x layers, tokens, kv_heads, head_dim] and scale exponents
    [2 x layers, tokens, kv_heads] (K of layer l at 2l, V at 2l + 1), on the device the payload was decoded to.
    Dequantized where it is written, and only for the positions restored."""
    q: torch.Tensor
    exponent: torch.Tensor

    def rows(self, positions: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        scale = torch.exp2((_take(self.exponent, positions).float() - 160) / 4)
        return (_take(self.q, positions).float() * scale.unsqueeze(-1)).to(dtype)


@dataclass
class Snapshot:
    """A decoded snapshot: the token ids and the KV of every layer, [2 x layers, tokens, kv_heads, head_dim] (K of
    layer l at 2l, V at 2l + 1; `Int8Kv` for the int8 encoding): views into one payload tensor on the pool's
    device."""
    token_ids: list[int]
    kv: torch.Tensor | Int8Kv
    encoding: str
    block_size: int
    payload: torch.Tensor

    def rows(self, positions: torch.Tensor | slice, dtype: torch.dtype) -> torch.Tensor:
        """[2 x layers, len(positions), kv_heads, head_dim] in `dtype`: every layer's K and V at `positions`
        (a handful of kernels for all layers, not a handful per layer; a slice of raw KV is a view)."""
        if isinstance(self.kv, Int8Kv):
            return self.kv.rows(positions, dtype)
        return _take(self.kv, positions).to(dtype)

    def dense(self) -> torch.Tensor:
        """All of it in float32, [2 x layers, tokens, kv_heads, head_dim]."""
        return self.rows(slice(None), torch.float32)


def _take(t: torch.Tensor, positions: torch.Tensor | slice) -> torch.Tensor:
    """t[:, positions]: a view for a slice, one gather for an index tensor."""
    return t[:, positions] if isinstance(positions, slice) else t.index_select(1, positions)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def payload_checksum(payload: torch.Tensor) -> int:
    """sum((2i + 1) * w_i) mod 2**64 over the int64 words of `payload` (uint8, a multiple of 8 bytes, contiguous),
    computed on its device. Wrapping int64 sums are exact mod 2**64 in any order, so every device agrees."""
    words = payload.view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=words.device)
    for start in range(0, words.numel(), _CHECKSUM_WORDS):
        chunk = words[start:start + _CHECKSUM_WORDS]
        weights = torch.arange(2 * start + 1, 2 * (start + chunk.numel()), 2, dtype=torch.int64, device=chunk.device)
        total += (chunk * weights).sum()
    return int(total) % 2**64   # one wait for the device, at the end


def read_kv(cache: KVCache, block_ids: Sequence[int], num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The K and V of a sequence's first `num_tokens` positions, per layer (copies, on the pool's device: `encode`
    quantizes and checksums there and copies the bytes to the host once)."""
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
    device = snap.payload.device
    offsets = torch.arange(bs, device=device)
    pairs = torch.tensor(blocks, dtype=torch.int64).to(device)
    # A restore into a cold cache takes every block from the first: read those positions in place.
    first_blocks = all(i == k for k, (i, _) in enumerate(blocks))
    positions = slice(0, len(blocks) * bs) if first_blocks else (pairs[:, :1] * bs + offsets).flatten()
    slots = (pairs[:, 1:] * bs + offsets).flatten()
    rows = snap.rows(positions, cache.layers[0][0].dtype)
    for i, (k, v) in enumerate(cache.layers):   # index_copy_: a tenth of the host time of `pool[slots] = rows`
        k.view(-1, *k.shape[2:]).index_copy_(0, slots, rows[2 * i])
        v.view(-1, *v.shape[2:]).index_copy_(0, slots, rows[2 * i + 1])


def encode(identity: SnapshotIdentity, token_ids: Sequence[int], layers: list[tuple[torch.Tensor, torch.Tensor]],
           block_size: int, encoding: str = "raw") -> bytes:
    """The blob of `token_ids` and their KV (as `read_kv` returns it)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"snapshot encoding must be one of {ENCODINGS}, got {encoding!r}")
    header = {**identity.header(), "format": FORMAT_VERSION, "encoding": encoding, "tokens": len(token_ids),
              "block_size": block_size}
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-(len(MAGIC) + 4 + len(head) + 4 * len(token_ids)) % 8)   # the payload starts 8-aligned
    prefix = b"".join([MAGIC, struct.pack("<I", len(head)), head, np.asarray(token_ids, dtype="<i4").tobytes()])
    parts = [part for pair in layers for t in pair for part in _encode_tensor(t, encoding)]
    size = sum(p.numel() for p in parts)
    device = parts[0].device if parts else torch.device("cpu")
    payload = torch.zeros(size + -size % 8, dtype=torch.uint8, device=device)
    if parts:
        torch.cat(parts, out=payload[:size])
    checksum = payload_checksum(payload)
    body = payload[:size].cpu().numpy().tobytes()
    return b"".join([prefix, body, hashlib.sha256(prefix).digest(), struct.pack("<Q", checksum)])


def _encode_tensor(t: torch.Tensor, encoding: str) -> list[torch.Tensor]:
    """The bytes of one K or V, as flat uint8 tensors on its device."""
    if encoding == "raw":
        return [_flat_bytes(t)]
    x = t.float()
    exponent = torch.ceil(4 * torch.log2(x.abs().amax(dim=-1).clamp_min(1e-30) / 127)).clamp(-160, 95)
    q = torch.round(x / torch.exp2(exponent / 4).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return [_flat_bytes((exponent + 160).to(torch.uint8)), _flat_bytes(q)]


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).flatten()


def _tensor_bytes(header: dict) -> int:
    n, heads, dim = header["tokens"], header["kv_heads"], header["head_dim"]
    if header["encoding"] == "raw":
        return n * heads * dim * torch.empty((), dtype=_DTYPES[header["dtype"]]).element_size()
    return n * heads * (1 + dim)


def expected_size(header: dict, head_len: int) -> int:
    return len(MAGIC) + 4 + head_len + 4 * header["tokens"] + 2 * header["layers"] * _tensor_bytes(header) + _TRAILER
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


def decode(blob: bytes, identity: SnapshotIdentity, *, max_tokens: int, max_bytes: int | None = None,
           uploader: PayloadUploader | None = None) -> Snapshot:
    """Check and decode a blob for an engine of `identity`, with the KV where `uploader` puts it (default: on
    the host). Typed errors (`SnapshotError`) for anything else: another
    model/tokenizer/dtype, a changed byte, a short blob, more than `max_tokens` tokens or `max_bytes`."""
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
    view = memoryview(blob).cast("B")
    n = header["tokens"]
    payload_start = len(MAGIC) + 4 + head_len + 4 * n
    payload_end = size - _TRAILER
    if hashlib.sha256(view[:payload_start]).digest() != bytes(view[payload_end:payload_end + _DIGEST]):
        raise SnapshotCorrupt("snapshot checksum mismatch: its header or token ids were changed or damaged")
    for key, want in identity.header().items():
        if header[key] != want:
            what = {"model": "another model's weights", "tokenizer": "another tokenizer or chat template"}.get(
                key, f"{key} {header[key]!r} (this engine: {want!r})")
            raise SnapshotMismatch(f"snapshot is of {what}; it cannot be restored into this engine")
    uploader = uploader or PayloadUploader()
    (want_sum,) = struct.unpack_from("<Q", view, payload_end + _DIGEST)
    payload = uploader.upload(view[payload_start:payload_end])
    if payload_checksum(payload) != want_sum:
        raise SnapshotCorrupt("snapshot checksum mismatch: its KV bytes were changed or damaged")
    token_ids = np.frombuffer(view, dtype="<i4", count=n, offset=len(MAGIC) + 4 + head_len).astype(np.int64).tolist()
    shape = (2 * header["layers"], n, header["kv_heads"], header["head_dim"])
    kv = _decode_kv(payload[:shape[0] * _tensor_bytes(header)], header["encoding"], _DTYPES[header["dtype"]], shape)
    return Snapshot(token_ids, kv, header["encoding"], header["block_size"], payload)


class PayloadUploader:
    """Puts a snapshot's payload on the pool's device, 8-aligned and zero-padded. To a GPU in 4 MB pieces through
    a ring of pinned buffers allocated once, with the engine (pinning 65 MB at the first restore took 20 ms):
    worker threads copy pieces into free ring slots (numpy lets go of the GIL) while the pieces before them are
    on their way to the device, each piece sent as soon as its copy is done. On an H200 host a pageable copy of
    33 MB took 5.3 ms; one thread copying it into pinned memory 6.8 ms, four threads 1.8 ms (more did not
    help: the host's memory bandwidth), the device copy 0.65 ms hidden behind them. The copies go on the
    caller's current stream, the one the engine computes on: a restore waits for the steps queued before it,
    and its blocks are written after it."""

    PIECE = 4 << 20

    def __init__(self, device: torch.device | str = "cpu", threads: int = 4) -> None:
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._copiers = ThreadPoolExecutor(threads, thread_name_prefix="gllm-upload") if self.gpu else None
        ring = [torch.empty(self.PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(2 * threads)] \
            if self.gpu else []
        self._ring = [(buffer, buffer.numpy()) for buffer in ring]
        self._sent: list[torch.cuda.Event | None] = [None] * len(ring)   # each slot's last device copy

    def close(self) -> None:
        if self._copiers is not None:
            self._copiers.shutdown(wait=False)

    def upload(self, data: memoryview) -> torch.Tensor:
        n = len(data)
        src = np.frombuffer(data, dtype=np.uint8)
        if not self.gpu:
            staged = torch.empty(n + -n % 8, dtype=torch.uint8)
            staged[n:] = 0
            np.copyto(staged.numpy()[:n], src)
            return staged
        out = torch.empty(n + -n % 8, dtype=torch.uint8, device=self.device)
        out[n:] = 0
        spans = [(at, min(at + self.PIECE, n)) for at in range(0, n, self.PIECE)]
        slots = len(self._ring)
        with self._lock:
            copies = {}

            def copy(i: int) -> None:   # piece i into slot i % slots, once that slot's last piece has left
                a, b = spans[i]
                copies[i] = self._copiers.submit(_copy_after, self._sent[i % slots], self._ring[i % slots][1][:b - a],
                                                 src[a:b])

            for i in range(min(slots, len(spans))):
                copy(i)
            for i, (a, b) in enumerate(spans):
                copies.pop(i).result()
                out[a:b].copy_(self._ring[i % slots][0][:b - a], non_blocking=True)
                self._sent[i % slots] = sent = torch.cuda.Event()
                sent.record()
                if i + slots < len(spans):
                    copy(i + slots)
        return out


def _copy_after(sent: torch.cuda.Event | None, dst: np.ndarray, src: np.ndarray) -> None:
    if sent is not None:
        sent.synchronize()
    np.copyto(dst, src)


def _decode_kv(data: torch.Tensor, encoding: str, dtype: torch.dtype,
               shape: tuple[int, int, int, int]) -> torch.Tensor | Int8Kv:
    """Views of the payload: every K and V as one [2 x layers, tokens, heads, dim] tensor (strided for int8, where
    each K or V is its scale bytes, then its values)."""
    if encoding == "raw":
        return data.view(dtype).view(shape)
    tensors, n, heads, dim = shape
    per_tensor = data.view(tensors, n * heads * (1 + dim))
    return Int8Kv(per_tensor[:, n * heads:].view(torch.int8).unflatten(1, (n, heads, dim)),
                  per_tensor[:, :n * heads].unflatten(1, (n, heads)))

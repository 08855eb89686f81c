"""NPC memory on the KV pool: session snapshots (export a conversation's KV blocks, restore them into the prefix
cache) and pinned prefixes (blocks kept resident until unpinned). Every method that touches blocks runs on the
engine thread, between steps (`LLMEngine` queues them there); decoding a blob does not touch blocks and runs
on the caller's thread.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from gllm.engine.errors import PinRefused
from gllm.kv import BlockManager, KVCache
from gllm.kv.snapshot import Snapshot, SnapshotError, SnapshotTooLarge, read_kv, write_kv

# Finished requests whose token ids are remembered for `snapshot(request_id)`.
RECENT_REQUESTS = 256


@dataclass(frozen=True)
class RestoreInfo:
    tokens: int          # tokens of the snapshot now in the prefix cache (whole blocks of this engine)
    new_blocks: int      # blocks written (the rest were cached already)
    check_s: float = 0.0   # checking the blob and putting its KV on the pool's device (caller's thread)
    write_s: float = 0.0   # waiting for the engine thread, taking blocks and queueing the KV writes


def pin_id_of(token_ids: list[int]) -> str:
    return "pin-" + hashlib.sha256(json.dumps(token_ids).encode()).hexdigest()[:16]


class SessionStore:
    def __init__(self, block_manager: BlockManager, kv_cache: KVCache, max_seq_len: int) -> None:
        self.blocks, self.kv_cache, self.max_seq_len = block_manager, kv_cache, max_seq_len
        self.recent: OrderedDict[str, list[int]] = OrderedDict()   # request id -> prompt + output ids
        self.pins: dict[str, list[int]] = {}                      # pin id -> the blocks it holds
        self._pinned = Counter[int]()                             # block id -> pins holding it

    # --- snapshots -----------------------------------------------------------------------------------

    def remember(self, request_id: str, token_ids: list[int]) -> None:
        self.recent[request_id] = token_ids
        self.recent.move_to_end(request_id)
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def tokens_of(self, source: list[int] | str) -> list[int]:
        if isinstance(source, str):
            if source not in self.recent:
                raise SnapshotError(f"no finished request {source!r} is remembered (the last {RECENT_REQUESTS} are)")
            return self.recent[source]
        if not isinstance(source, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in source):
            raise SnapshotError("snapshot takes a request id or a list of token ids")
        return list(source)

    def read(self, source: list[int] | str) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
        """The longest prefix of whole blocks of `source` that the prefix cache holds: its token ids and a copy of
        its KV per layer (on the pool's device; encoding it into a blob is the caller's, off the engine thread)."""
        token_ids = self.tokens_of(source)
        held = self.blocks.cached_blocks(token_ids)
        if not held:
            raise SnapshotError("none of these tokens' KV blocks is in the prefix cache (a whole block is "
                                f"{self.blocks.block_size} tokens; a finished request's last token has no KV)")
        n = len(held) * self.blocks.block_size
        self.blocks.hold(held)   # not needed between steps, but keeps the rule: blocks read are blocks held
        try:
            layers = read_kv(self.kv_cache, held, n)
        finally:
            self.blocks.release(held)
        return token_ids[:n], layers

    def restore(self, snap: Snapshot) -> RestoreInfo:
        """Put a decoded snapshot's whole blocks into the prefix cache (evictable like any cached block)."""
        if not self.blocks.enable_prefix_caching:
            raise SnapshotError("this engine runs without a prefix cache: a snapshot has nowhere to go")
        bs = self.blocks.block_size
        token_ids = snap.token_ids[: len(snap.token_ids) // bs * bs]
        imported = self.blocks.import_blocks(token_ids)
        if imported is None:
            raise SnapshotTooLarge(f"restoring {len(token_ids)} tokens needs up to {len(token_ids) // bs} free KV "
                                   f"blocks; {self.blocks.num_free_blocks} are free now")
        held, fresh = imported
        try:
            write_kv(self.kv_cache, fresh, snap)
        except Exception:
            self.blocks.release(held, uncache=True)   # half-written blocks must not be found
            raise
        self.blocks.release(held)
        return RestoreInfo(len(held) * bs, len(fresh))

    # --- pins ----------------------------------------------------------------------------------------

    @property
    def num_pinned_blocks(self) -> int:
        return len(self._pinned)

    @property
    def pin_limit(self) -> int:
        """Pins may hold at most this many blocks: a full max_seq_len request always fits beside them."""
        return self.blocks.num_blocks - self.blocks.blocks_needed(self.max_seq_len)

    def pin(self, token_ids: list[int]) -> str | None:
        """Pin the cached whole blocks of `token_ids`; its id, or None when they are not all cached (compute
        them first). `PinRefused` when the pin would cross `pin_limit`. Pinning the same tokens again is a no-op."""
        pin_id = pin_id_of(token_ids)
        if pin_id in self.pins:
            return pin_id
        bs = self.blocks.block_size
        if len(token_ids) < bs:
            raise PinRefused(f"a pin needs at least one whole KV block ({bs} tokens); got {len(token_ids)}", "pin")
        held = self.blocks.cached_blocks(token_ids)
        if len(held) < len(token_ids) // bs:
            return None
        after = len(set(self._pinned) | set(held))
        if after > self.pin_limit:
            raise PinRefused(f"pinning {len(held)} blocks would pin {after} of {self.blocks.num_blocks}; at most "
                             f"{self.pin_limit} may be pinned so a max_seq_len request still fits", "pin")
        self.blocks.hold(held)
        self.pins[pin_id] = held
        self._pinned.update(held)
        return pin_id

    def unpin(self, pin_id: str) -> bool:
        held = self.pins.pop(pin_id, None)
        if held is None:
            return False
        self._pinned.subtract(held)
        self._pinned = +self._pinned   # drop the zero counts
        self.blocks.release(held)
        return True

    def unpin_all(self) -> None:
        for pin_id in list(self.pins):
            self.unpin(pin_id)

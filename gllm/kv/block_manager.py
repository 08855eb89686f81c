"""`BlockManager`: paged KV block allocation with reference counts and prefix caching.

A full block whose KV has been computed is registered under a chained content hash
(hash of the parent block's hash and its own tokens), so a later sequence with the same
prefix reuses it. Freed blocks that carry a hash stay findable until they are reused,
least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class PrefixCacheStats:
    hits: int = 0      # blocks reused from the cache
    misses: int = 0    # full prompt blocks looked up and not found


@dataclass
class BlockTable:
    """The blocks one sequence holds, in order, and how many of them are registered in the cache."""
    block_ids: list[int] = field(default_factory=list)
    num_hashed: int = 0
    last_hash: int | None = None


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # A stack: freed blocks are reused before untouched ones, which come in ascending order, so the pool's
        # memory in use (CPU pools are mapped as they are first written) follows the peak load, not the traffic.
        self._free_plain: deque[int] = deque(reversed(range(num_blocks)))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self._hash_to_block: dict[int, int] = {}
        self.stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding a prefix of `token_ids`; always leaves one token to compute."""
        return self.cached_blocks(token_ids[:-1]) if token_ids else []

    def cached_blocks(self, token_ids: list[int]) -> list[int]:
        """Cached blocks holding the full blocks of `token_ids`, in order, as far as they are cached."""
        if not self.enable_prefix_caching:
            return []
        matched: list[int] = []
        parent = None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start:start + self.block_size])
            h = chain_hash(parent, tokens)
            block_id = self._hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            matched.append(block_id)
            parent = h
        return matched

    def allocate_prompt(self, table: BlockTable, token_ids: list[int], max_tokens: int) -> tuple[int, int] | None:
        """Give an empty table the cached prefix of `token_ids` plus blocks for up to `max_tokens`
        more of them. Returns (tokens served from the cache, tokens to compute now), or None
        (nothing taken) if blocks are short."""
        assert not table.block_ids
        cached = self.match_prefix(token_ids)
        cached_tokens = len(cached) * self.block_size
        num_tokens = min(len(token_ids) - cached_tokens, max_tokens)
        reusable_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        new_blocks = self.blocks_needed(cached_tokens + num_tokens) - len(cached)
        if new_blocks + reusable_free > self.num_free_blocks:
            return None
        if self.enable_prefix_caching:
            self.stats.hits += len(cached)
            self.stats.misses += (len(token_ids) - 1) // self.block_size - len(cached)
        for block_id in cached:
            self._take(block_id)
        table.block_ids.extend(cached)
        table.num_hashed = len(cached)
        table.last_hash = self.blocks[cached[-1]].hash if cached else None
        table.block_ids.extend(self._allocate_new() for _ in range(new_blocks))
        return cached_tokens, num_tokens

    def grow(self, table: BlockTable, total_tokens: int) -> bool:
        """Make room for `total_tokens` tokens in `table`; False (nothing taken) if blocks are short."""
        missing = self.blocks_needed(total_tokens) - len(table.block_ids)
        if missing > self.num_free_blocks:
            return False
        table.block_ids.extend(self._allocate_new() for _ in range(max(0, missing)))
        return True

    def register_computed(self, table: BlockTable, token_ids: list[int], num_computed: int) -> None:
        """Publish the full blocks among the first `num_computed` tokens so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        while (table.num_hashed + 1) * self.block_size <= num_computed:
            i = table.num_hashed
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(table.last_hash, tokens)
            block = self.blocks[table.block_ids[i]]
            if h not in self._hash_to_block:  # a twin block already published keeps the entry
                block.hash, block.token_ids = h, tokens
                self._hash_to_block[h] = block.block_id
            table.last_hash = h
            table.num_hashed += 1

    def free(self, table: BlockTable, uncache: bool = False) -> None:
        """Drop the table's references; the tail goes first so a prefix outlives its suffixes in the LRU.

        `uncache` also withdraws the table's blocks from the prefix cache (their contents are suspect).
        """
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if uncache and block.hash is not None:
                del self._hash_to_block[block.hash]
                block.hash, block.token_ids = None, ()
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain.append(block_id)
        table.block_ids.clear()
        table.num_hashed, table.last_hash = 0, None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free_cached[block_id]
        block.ref_count += 1

    def _allocate_new(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.pop()
        else:
            block_id, _ = self._free_cached.popitem(last=False)   # evict the least recently freed
            evicted = self.blocks[block_id]
            del self._hash_to_block[evicted.hash]
            evicted.hash, evicted.token_ids = None, ()
        self.blocks[block_id].ref_count = 1
        return block_id

    # --- snapshots and pins: blocks held outside any sequence ----------------------------------------

    def import_blocks(self, token_ids: list[int]) -> tuple[list[int], list[tuple[int, int]]] | None:
        """Hold every full block of `token_ids` in the prefix cache: the cached ones as they are, fresh ones
        registered under their hash for the rest (their KV is the caller's to write before any step runs).
        Returns (every block held, in order; the fresh ones as (block index, block id)), or None (nothing
        taken) when free blocks are short. Give them back with `release`."""
        if not self.enable_prefix_caching:
            return [], []
        held = self.cached_blocks(token_ids)
        total = len(token_ids) // self.block_size
        reusable_free = sum(1 for b in held if self.blocks[b].ref_count == 0)
        if total - len(held) + reusable_free > self.num_free_blocks:
            return None
        for block_id in held:   # first: allocating the fresh ones must not evict these
            self._take(block_id)
        parent = self.blocks[held[-1]].hash if held else None
        fresh: list[tuple[int, int]] = []
        for i in range(len(held), total):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            h = chain_hash(parent, tokens)
            if h in self._hash_to_block:   # cached past a hole in the chain: hold it; a collision: stop here
                if self.blocks[self._hash_to_block[h]].token_ids != tokens:
                    break
                self._take(self._hash_to_block[h])
                held.append(self._hash_to_block[h])
                parent = h
                continue
            if not self.num_free_blocks:   # taking cached blocks above used free ones the count left for these
                break
            block = self.blocks[self._allocate_new()]
            block.hash, block.token_ids = h, tokens
            self._hash_to_block[h] = block.block_id
            held.append(block.block_id)
            fresh.append((i, block.block_id))
            parent = h
        return held, fresh

    def hold(self, block_ids: list[int]) -> None:
        """Take one more reference on each of these (cached or in use) blocks: they stay until `release`."""
        for block_id in block_ids:
            self._take(block_id)

    def release(self, block_ids: list[int], uncache: bool = False) -> None:
        """Drop the references `import_blocks` or `hold` took (the tail first, like `free`)."""
        self.free(BlockTable(block_ids=list(block_ids)), uncache=uncache)


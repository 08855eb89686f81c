"""The prompt-result cache: finished results of deterministic requests (temperature 0, or a fixed seed), so a
repeated bark or tutorial line is answered at once instead of decoded again.

The key is a SHA-256 over the model's identity, the prompt's token ids and every field that can change the
output (the sampling fields of `gllm.request_fields`, the stop token ids and the EOS set, the max_seq_len cap).
Entries are LRU-bounded by count and by bytes. Only results that ended by themselves ("stop" or "length") are
stored. Engine thread only: no locking.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from gllm.engine.request import GenerationResult
from gllm.request_fields import SAMPLING_FIELDS
from gllm.sampling import SamplingParams


@dataclass
class ResultCacheStats:
    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0
    evictions: int = 0


def is_deterministic(params: SamplingParams) -> bool:
    """Whether the same request always gives the same result: greedy or seeded, with no Python callback."""
    return params.logits_processor is None and (params.temperature == 0 or params.seed is not None)


def result_key(model_identity: str, prompt_ids: Iterable[int], params: SamplingParams, max_new_tokens: int,
               eos_ids: Iterable[int]) -> str:
    fields = {f.name: getattr(params, f.name) for f in SAMPLING_FIELDS}
    fields.update(max_new_tokens=max_new_tokens, stop_token_ids=sorted(params.stop_token_ids), eos=sorted(eos_ids))
    h = hashlib.sha256(model_identity.encode())
    h.update(json.dumps(fields, sort_keys=True, default=list).encode())
    h.update(json.dumps(list(prompt_ids)).encode())
    return h.hexdigest()


def result_bytes(result: GenerationResult) -> int:
    """An estimate of what an entry holds in memory: its text, token ids and logprobs."""
    size = 200 + sys.getsizeof(result.text) + 8 * len(result.tokens)
    for lp in result.logprobs or ():
        size += 64 + 48 * len(getattr(lp, "top", ()) or ())
    return size


class ResultCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, tuple[GenerationResult, int]] = OrderedDict()
        self.stats = ResultCacheStats()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def get(self, key: str) -> GenerationResult | None:
        """A copy of the stored result (counted as a hit or a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return copy.deepcopy(entry[0])

    def put(self, key: str, result: GenerationResult) -> None:
        if result.finish_reason not in ("stop", "length") or result.error is not None:
            return
        size = result_bytes(result)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.stats.bytes -= self._entries.pop(key)[1]
        self._entries[key] = (copy.deepcopy(result), size)
        self.stats.bytes += size
        while len(self._entries) > self.max_entries or self.stats.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.stats.bytes -= dropped
            self.stats.evictions += 1
        self.stats.entries = len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

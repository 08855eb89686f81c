"""`Sequence`: the scheduler's view of one request — its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gllm.kv import BlockTable


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]          # prompt followed by generated tokens
    num_prompt_tokens: int
    priority: int = 0             # higher runs first and is preempted last
    arrival: int = 0              # admission order among equal priorities
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0    # of those, served by the prefix cache at the last admission
    num_preemptions: int = 0
    block_table: BlockTable = field(default_factory=BlockTable)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed > 1

    def rank(self) -> tuple[int, int]:
        """Sort key: most important first."""
        return (-self.priority, self.arrival)

"""`Sequence`: the scheduler's view of one request — its tokens, progress and KV blocks."""

from __future__ import annotations

import enum
import math
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
    deadline: float = math.inf    # when its first token is wanted (monotonic s): earliest first, within a priority
    token_interval: float = 0.0   # pacing: least seconds between its tokens (0 = unpaced)
    last_step: int = 0            # the scheduler's step count when it last computed (strict budgets take turns)
    next_token_at: float = -math.inf  # pacing: when it may decode again (monotonic s; -inf: no token yet)
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

    def rank(self) -> tuple[int, float, int]:
        """Sort key: most important first; within a priority, the earliest first-token deadline."""
        return (-self.priority, self.deadline, self.arrival)

    def due(self, now: float) -> bool:
        """Whether a step at `now` should compute for it: always, unless it is a paced decode ahead of its pace."""
        return self.token_interval <= 0 or self.is_prefilling or now >= self.next_token_at

    def paced(self, now: float) -> None:
        """It decodes a token at `now`: the next one is due an interval later. A token that came late (steps
        fall on their own clock) lets the next come up to one interval early, so the pace does not drift below
        the rate with steps up to an interval long; after a longer gap that is one extra token, never a burst."""
        if self.token_interval > 0:
            late = now - self.token_interval
            base = now if self.next_token_at == -math.inf else max(self.next_token_at, late)
            self.next_token_at = base + self.token_interval

"""`Scheduler`: who runs this step.

Continuous batching: sequences join and leave at every step. Each step has a token budget;
running decodes are scheduled first (one token each), then unfinished prefills, then new
admissions, each prefill chunked to what the budget has left — so a long prompt never stalls
the decodes. When KV blocks run out, the least important running sequence is preempted by
recompute: its blocks are freed and it waits to be prefilled again (mostly from the prefix cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from gllm.kv import BlockManager
from gllm.scheduler.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8        # sequences running at once
    max_step_tokens: int = 512     # tokens computed per step, prefill chunks included

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_step_tokens < self.max_batch_size:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= max_batch_size "
                             f"({self.max_batch_size}) so every running decode fits in a step")


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int               # tokens computed for it this step
    samples: bool = field(init=False)  # whether this step reaches the sequence's end and yields a token

    def __post_init__(self) -> None:
        self.samples = self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.blocks = block_manager
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._arrivals = count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (done, cancelled or failed) and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = SequenceStatus.FINISHED

    def schedule_step(self) -> SchedulerOutput:
        out = SchedulerOutput()
        # Decodes first, then prefills in progress; most important first within each.
        queue = sorted(self.running, key=lambda s: (s.is_prefilling, s.rank()))
        while queue and self._budget_left(out) > 0:
            seq = queue.pop(0)
            n = min(seq.num_uncomputed, self._budget_left(out))
            while not self.blocks.grow(seq.block_table, seq.num_computed_tokens + n):
                victim = self._pick_victim(seq, queue, out)
                self._preempt(victim, queue, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
        self._admit(out)
        return out

    def _budget_left(self, out: SchedulerOutput) -> int:
        return self.config.max_step_tokens - out.num_tokens

    def _admit(self, out: SchedulerOutput) -> None:
        while self.waiting and self._budget_left(out) > 0:
            self.waiting.sort(key=Sequence.rank)
            seq = self.waiting[0]
            if len(self.running) >= self.config.max_batch_size:
                if not self._preempt_lower(seq, out):
                    break
                continue
            admitted = self.blocks.allocate_prompt(seq.block_table, seq.token_ids, self._budget_left(out))
            if admitted is None:
                if not self._preempt_lower(seq, out):
                    break
                continue
            cached, n = admitted
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))

    def _pick_victim(self, seq: Sequence, queue: list[Sequence], out: SchedulerOutput) -> Sequence:
        """The least important of the unscheduled and scheduled others if it ranks below `seq`, else `seq`."""
        others = queue + [s.seq for s in out.scheduled]
        victim = max(others, key=Sequence.rank, default=seq)
        return victim if victim.rank() > seq.rank() else seq

    def _preempt_lower(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Make room for waiting `seq` by preempting a running sequence of strictly lower priority."""
        victim = max(self.running, key=Sequence.rank, default=None)
        if victim is None or victim.priority >= seq.priority:
            return False
        self._preempt(victim, [], out)
        return True

    def _preempt(self, victim: Sequence, queue: list[Sequence], out: SchedulerOutput) -> None:
        if victim in queue:
            queue.remove(victim)
        out.scheduled = [s for s in out.scheduled if s.seq is not victim]
        self.running.remove(victim)
        self.blocks.free(victim.block_table)
        victim.num_computed_tokens = victim.num_cached_tokens = 0
        victim.num_preemptions += 1
        victim.status = SequenceStatus.WAITING
        self.waiting.append(victim)
        out.preempted.append(victim)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens just computed and publish its full blocks."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.blocks.register_computed(s.seq.block_table, s.seq.token_ids, s.seq.num_computed_tokens)

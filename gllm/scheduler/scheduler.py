"""`Scheduler`: who runs this step.

Continuous batching: sequences join and leave at every step. Each step has a token budget;
running decodes are scheduled first (one token each), then unfinished prefills, then new
admissions, each prefill chunked to what the budget has left — so a long prompt never stalls
the decodes. A paced sequence (`token_interval`) sits out the steps before its next token is due.
When KV blocks run out, the least important running sequence is preempted by
recompute: its blocks are freed and it waits to be prefilled again (mostly from the prefix cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import count

from gllm.kv import BlockManager
from gllm.scheduler.sequence import Sequence, SequenceStatus
from gllm.scheduler.step_cost import StepCostModel, StepShape

# With a step-time budget, the least prefill a step still makes when its decodes fill the budget: long
# prompts keep moving.
MIN_PREFILL_CHUNK = 16
# ... or more, where the cost model says more costs next to nothing: such a step is over its budget anyway, and
# on a GPU a step of a few hundred prompt tokens takes about what one of 16 does (the weights are read once).
# The least piece grows while its predicted time stays within this factor of a 16-token piece's.
LEAST_PIECE_SLACK = 1.25
LEAST_PIECE_MAX = 128     # and no further than this from a model fitted mostly on small steps
# Under a step-time budget, before the cost model has seen enough of this device's steps to predict: at most
# this many prefill tokens a step (a cautious guess beats an unbounded step).
UNFITTED_PREFILL_TOKENS = 64


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8        # sequences running at once
    max_step_tokens: int = 512     # tokens computed per step, prefill chunks included
    step_budget_s: float | None = None  # predicted seconds a step may take (prefill chunks sized to fit)
    # A game's idle window's forced step (see `Scheduler.strict_budget`) decodes every due running row, not one:
    # on a GPU a decode step reads the weights once for all its rows, so a whole batch costs about what one
    # row does (False on a CPU, where each row is work of its own).
    forced_step_decodes_all: bool = False

    def __post_init__(self) -> None:
        if self.step_budget_s is not None and not self.step_budget_s > 0:
            raise ValueError(f"step_budget_s must be > 0, got {self.step_budget_s}")
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
    num_tokens: int = 0           # sum of scheduled num_tokens, kept as they are added and removed
    shape: StepShape | None = None  # what the step computes, for the step cost model (set once scheduled)

    def add(self, item: ScheduledSeq) -> None:
        self.scheduled.append(item)
        self.num_tokens += item.num_tokens

    def remove(self, seq: Sequence) -> bool:
        for i, item in enumerate(self.scheduled):
            if item.seq is seq:
                self.num_tokens -= item.num_tokens
                del self.scheduled[i]
                return True
        return False


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 cost_model: StepCostModel | None = None) -> None:
        self.config = config
        self.blocks = block_manager
        self.cost = cost_model                # used once fitted, with a step budget
        # The step budget in force: the configured one, or a tighter one while the frame governor asks for it.
        self.step_budget_s: float | None = config.step_budget_s
        # Whether every step's shape is computed (for the cost model to learn from) even with no budget in force,
        # so that a budget set later (by the frame governor) applies at once.
        self.learn_shapes = False
        # Inside a game's idle window (see engine/compute_windows.py) the budget is strict: decode rows must fit it
        # too (the rest wait, least recently served last), and a step that fits nothing computes nothing — except
        # the window's first step (`guarantee_progress`), which always makes its least piece of progress.
        self.strict_budget = False
        self.guarantee_progress = True
        self._forced_running = False   # whether the last window's forced progress went to running sequences
        self._forcing_decodes = False  # this step is a window's forced step that decodes every due row
        self._steps = 0
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._arrivals = count()
        # Per step: blocks published this step (id -> owner) and owners whose fresh blocks another
        # sequence already shares, which therefore must compute this step and cannot be preempted.
        self._published: dict[int, Sequence] = {}
        self._pinned: set[int] = set()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, failed: bool = False) -> None:
        """Remove a sequence (done, cancelled or failed) and free its blocks.

        A sequence whose step failed may hold blocks published but never written: they leave the cache.
        """
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table, uncache=failed)
        seq.status = SequenceStatus.FINISHED

    def schedule_step(self, now: float | None = None) -> SchedulerOutput:
        """This step's batch; `now` (monotonic seconds, default the clock) decides which paced sequences are due."""
        now = time.monotonic() if now is None else now
        out = SchedulerOutput()
        self._published.clear()
        self._pinned.clear()
        # Decodes first, then prefills in progress; most important first within each.
        queue = sorted((s for s in self.running if s.due(now)), key=self._queue_order)
        # A window's forced progress alternates between the running and the waiting, so that a strict budget
        # no step fits cannot keep new requests out while running ones decode a row per window.
        admit_first = self.strict_budget and self.guarantee_progress and bool(self.waiting) and self._forced_running
        self._forcing_decodes = (self.strict_budget and self.guarantee_progress and not admit_first
                                 and self.config.forced_step_decodes_all)
        admission_tried = admit_first
        if admit_first:
            self._admit(out)
            if not out.scheduled:   # nobody could be admitted (the batch is full): the forced progress goes to
                admit_first = False  # the running after all, on a GPU the whole batch, not a single row
                self._forcing_decodes = self.config.forced_step_decodes_all
        while queue:
            if self._budget_left(out, queue[0]) <= 0:
                if not self.strict_budget:
                    break
                queue.pop(0)      # a strict budget: what does not fit sits this step out; smaller work may fit
                continue
            seq = queue.pop(0)
            n = min(seq.num_uncomputed, self._budget_left(out, seq))
            while not self.blocks.grow(seq.block_table, seq.num_computed_tokens + n):
                victim = self._pick_victim(seq, queue, out)
                self._preempt(victim, queue, out)
                if victim is seq:
                    break
            else:
                self._schedule(seq, n, out)
        if not admission_tried:
            self._admit(out)
        if self.strict_budget and self.guarantee_progress and out.scheduled:
            self._forced_running = not admit_first
        self._steps += 1
        for item in out.scheduled:
            item.seq.last_step = self._steps
            if item.samples:
                item.seq.paced(now)
        if self.step_budget_s is not None or self.learn_shapes:   # only the cost model reads it
            out.shape = self.shape(out)
        return out

    def seconds_until_due(self, now: float) -> float | None:
        """How long until the first running sequence that sits out its pace is due again (what the engine may
        sleep when a step found nothing to compute); None if none is paced ahead."""
        ahead = [s.next_token_at for s in self.running if not s.due(now)]
        return max(0.0, min(ahead) - now) if ahead else None

    def _schedule(self, seq: Sequence, n: int, out: SchedulerOutput) -> None:
        out.add(ScheduledSeq(seq, n))
        # Publish the blocks this step fills now, not after it: every layer writes all new K/V
        # before any attention reads, so a request admitted later in this same step can share them.
        table = seq.block_table
        already = table.num_hashed
        self.blocks.register_computed(table, seq.token_ids, seq.num_computed_tokens + n)
        for block_id in table.block_ids[already:table.num_hashed]:
            self._published[block_id] = seq

    def _budget_left(self, out: SchedulerOutput, seq: Sequence, start: int | None = None) -> int:
        """Tokens `seq` may compute this step: what the token budget has left, and for a prefill also what
        the time budget has left (decodes always get their token). `start`: where its chunk begins (a waiting
        sequence's cached prefix), default its computed tokens."""
        left = self.config.max_step_tokens - out.num_tokens
        budget_s = self.step_budget_s
        if left <= 0 or budget_s is None or self.cost is None:
            return left
        if not seq.is_prefilling:
            return left if self._decode_fits(out, seq, budget_s) else 0
        base = self.shape(out)
        if not self.cost.ready:
            return min(left, max(0, UNFITTED_PREFILL_TOKENS - base.prefill_tokens))
        start = seq.num_computed_tokens if start is None else start

        def shape_with(n: int) -> StepShape:
            return StepShape(base.prefill_tokens + n, base.decode_rows, base.kv_tokens + n * (start + n))

        limit = min(left, len(seq.token_ids) - start)
        fits = self.cost.largest_within(budget_s, limit, shape_with)
        if fits > 0 or base.prefill_tokens or (self.strict_budget and not self._may_force(out)):
            return fits
        least = min(limit, MIN_PREFILL_CHUNK)
        return max(least, self.cost.largest_within(LEAST_PIECE_SLACK * self.cost.predict(shape_with(least)),
                                                   min(limit, LEAST_PIECE_MAX), shape_with))

    def _decode_fits(self, out: SchedulerOutput, seq: Sequence, budget_s: float) -> bool:
        """Whether one more decode row still fits a strict budget (outside a game's idle window they all do)."""
        if not self.strict_budget or not self.cost.ready or self._may_force(out):
            return True
        if self._forcing_decodes and all(item.num_tokens == 1 for item in out.scheduled):
            return True
        base = self.shape(out)
        shape = StepShape(base.prefill_tokens, base.decode_rows + 1, base.kv_tokens + seq.num_computed_tokens + 1)
        return self.cost.predict(shape) <= budget_s

    def _may_force(self, out: SchedulerOutput) -> bool:
        return self.guarantee_progress and not out.scheduled

    def _queue_order(self, seq: Sequence) -> tuple:
        """Decodes before prefills in progress; most important first; under a strict budget, which lets only some
        rows through, the least recently served first within a priority (prefills in progress included), so
        every row takes its turn."""
        if self.strict_budget:
            return (-seq.priority, seq.last_step, seq.is_prefilling, seq.rank())
        return (seq.is_prefilling, seq.rank())

    @staticmethod
    def shape(out: SchedulerOutput) -> StepShape:
        prefill = decode = kv = 0
        for item in out.scheduled:
            seq = item.seq
            if seq.is_prefilling:
                prefill += item.num_tokens
            else:
                decode += 1
            kv += item.num_tokens * (seq.num_computed_tokens + item.num_tokens)
        return StepShape(prefill, decode, kv)

    def _admit(self, out: SchedulerOutput) -> None:
        while self.waiting:
            self.waiting.sort(key=Sequence.rank)
            seq = self.waiting[0]
            if len(self.running) >= self.config.max_batch_size and self._victim_for(seq) is None:
                break   # full, and nobody to make room: no need to match its prefix or size its piece
            cached = len(self.blocks.match_prefix(seq.token_ids)) * self.blocks.block_size
            budget = self._budget_left(out, seq, start=cached)
            if budget <= 0:
                break
            if len(self.running) >= self.config.max_batch_size:
                if not self._preempt_lower(seq, out):
                    break
                continue
            admitted = self.blocks.allocate_prompt(seq.block_table, seq.token_ids, budget)
            if admitted is None:
                if not self._preempt_lower(seq, out):
                    break
                continue
            cached, n = admitted
            for block_id in seq.block_table.block_ids[: cached // self.blocks.block_size]:
                if block_id in self._published:
                    self._pinned.add(self._published[block_id].seq_id)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = seq.num_cached_tokens = cached
            self.running.append(seq)
            self._schedule(seq, n, out)

    def _pick_victim(self, seq: Sequence, queue: list[Sequence], out: SchedulerOutput) -> Sequence:
        """The least important of the unscheduled and scheduled others if it ranks below `seq`, else `seq`."""
        others = queue + [s.seq for s in out.scheduled]
        victim = max(others, key=Sequence.rank, default=seq)
        return victim if victim.rank() > seq.rank() else seq

    def _victim_for(self, seq: Sequence) -> Sequence | None:
        """The running sequence to preempt for waiting `seq`: the least important unpinned one, if its priority
        is strictly lower; else None."""
        candidates = [s for s in self.running if s.seq_id not in self._pinned]
        victim = max(candidates, key=Sequence.rank, default=None)
        return victim if victim is not None and victim.priority < seq.priority else None

    def _preempt_lower(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """Make room for waiting `seq` by preempting a running sequence of strictly lower priority."""
        victim = self._victim_for(seq)
        if victim is None:
            return False
        self._preempt(victim, [], out)
        return True

    def _preempt(self, victim: Sequence, queue: list[Sequence], out: SchedulerOutput) -> None:
        if victim in queue:
            queue.remove(victim)
        was_scheduled = out.remove(victim)
        self.running.remove(victim)
        # A victim unscheduled mid-step published blocks it will not write now: withdraw them.
        self.blocks.free(victim.block_table, uncache=was_scheduled)
        victim.num_computed_tokens = victim.num_cached_tokens = 0
        victim.num_preemptions += 1
        victim.status = SequenceStatus.WAITING
        self.waiting.append(victim)
        out.preempted.append(victim)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens just computed."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_tokens

    def schedule_ahead(self, batch: list[Sequence], keep: list[Sequence],
                       now: float | None = None) -> SchedulerOutput | None:
        """The next step, chosen while the tokens of the step just queued (`batch`, all decoding) are still
        being sampled: one decode for each of `keep` (those of `batch` not about to hit their length limit),
        at position `num_computed_tokens`, where that sampled token goes. Only when it is the step
        `schedule_step` would pick once those tokens are known — every running sequence is in `batch`, none
        waiting could be admitted or preempt — and blocks are free; None otherwise. Call `commit_ahead`
        once the previous step's tokens are appended."""
        now = time.monotonic() if now is None else now
        if len(batch) != len(self.running) or not keep or len(keep) > self.config.max_step_tokens:
            return None
        if any(s.token_interval > 0 and now < s.next_token_at for s in keep):
            return None          # a paced sequence sits this one out: schedule_step decides
        if self.waiting and (len(keep) < self.config.max_batch_size
                             or max(w.priority for w in self.waiting) > min(s.priority for s in keep)):
            return None
        for seq in keep:
            if not self.blocks.grow(seq.block_table, seq.num_computed_tokens + 1):
                return None      # blocks are short: let schedule_step decide (it may preempt)
        out = SchedulerOutput()
        for seq in keep:
            item = ScheduledSeq(seq, 1)
            item.samples = True  # its input token is the one being sampled now
            out.add(item)
            seq.paced(now)
        if self.step_budget_s is not None or self.learn_shapes:   # only the cost model reads it
            out.shape = self.shape(out)
        return out

    def commit_ahead(self, out: SchedulerOutput) -> None:
        """Account a `schedule_ahead` step once its input tokens are in the sequences: advance and publish."""
        for s in out.scheduled:
            seq = s.seq
            if seq.status == SequenceStatus.RUNNING:
                seq.num_computed_tokens += 1
                self.blocks.register_computed(seq.block_table, seq.token_ids, seq.num_computed_tokens)

"""gllm.scheduler: continuous batching, chunked prefill budget, batch limit, priorities, preemption."""

from __future__ import annotations

import pytest

from gllm.kv import BlockManager
from gllm.scheduler import Scheduler, SchedulerConfig, SchedulerOutput, Sequence, SequenceStatus


def make(num_blocks=64, block_size=4, batch=4, step_tokens=16, caching=True) -> Scheduler:
    return Scheduler(SchedulerConfig(batch, step_tokens), BlockManager(num_blocks, block_size, caching))


def seq(seq_id: int, n: int, priority: int = 0) -> Sequence:
    return Sequence(seq_id, [1000 * seq_id + i for i in range(n)], n, priority=priority)


def run_step(s: Scheduler, new_token: int = 7, now: float | None = None):
    """One step as the engine does it: schedule, mark computed, append a token to each sampler."""
    out = s.schedule_step(now)
    samplers = [x.seq for x in out.scheduled if x.samples]
    s.on_step_done(out)
    for q in samplers:
        q.token_ids.append(new_token)
    return out


def test_chunked_prefill_never_stalls_decodes():
    s = make(step_tokens=8)
    a = seq(1, 3)
    s.add(a)
    run_step(s)                                  # a prefilled, now decoding
    b = seq(2, 30)
    s.add(b)
    for _ in range(4):
        out = run_step(s)
        by_seq = {x.seq.seq_id: x.num_tokens for x in out.scheduled}
        assert by_seq[1] == 1                    # the decode runs every step
        assert out.num_tokens <= 8
    assert b.num_computed_tokens == 7 * 4         # b advances in chunks of what is left
    assert [x.seq.seq_id for x in s.schedule_step().scheduled][0] == 1   # decodes come first


def test_max_batch_size_and_joining_leaving():
    s = make(batch=2)
    seqs = [seq(i, 3) for i in range(1, 5)]
    for q in seqs:
        s.add(q)
    out = run_step(s)
    assert {x.seq.seq_id for x in out.scheduled} == {1, 2}
    s.finish(seqs[0])                            # one leaves, the next joins at the following step
    out = run_step(s)
    assert {x.seq.seq_id for x in out.scheduled} == {2, 3}
    assert seqs[0].status == SequenceStatus.FINISHED


def test_priority_admits_first_and_preempts_lower_when_full():
    s = make(batch=2)
    low1, low2, high = seq(1, 3), seq(2, 3), seq(3, 3, priority=5)
    s.add(low1)
    s.add(low2)
    run_step(s)
    s.add(high)
    out = run_step(s)
    assert high.status == SequenceStatus.RUNNING
    assert low2 in out.preempted and low2.status == SequenceStatus.WAITING   # newest of the lowest goes
    assert low2.num_computed_tokens == 0 and low2.num_preemptions == 1
    s.finish(high)
    out = run_step(s)
    assert low2.status == SequenceStatus.RUNNING                           # and comes back later


def test_preemption_when_blocks_run_out_frees_and_restarts():
    s = make(num_blocks=4, block_size=4, batch=4, step_tokens=64, caching=False)
    a, b = seq(1, 7), seq(2, 7)
    s.add(a)
    s.add(b)
    run_step(s)                                   # 2 blocks each, all 4 used
    run_step(s)                                   # position 7 still fits
    assert s.blocks.num_free_blocks == 0
    out = run_step(s)                             # a's position 8 needs a third block: b (newer) is preempted
    assert b in out.preempted and a in [x.seq for x in out.scheduled]
    assert b.block_table.block_ids == [] and b.num_computed_tokens == 0
    s.finish(a)
    assert s.blocks.num_free_blocks == 4
    out = run_step(s)
    assert b.status == SequenceStatus.RUNNING and out.scheduled[0].num_tokens == 9   # prompt + 2 outputs again


def test_preempted_sequence_reuses_its_prefix_cache():
    s = make(num_blocks=4, block_size=4, step_tokens=64)
    a, b = seq(1, 7), seq(2, 7)
    s.add(a)
    s.add(b)
    for _ in range(3):
        run_step(s)                               # the third preempts b; a evicts b's tail block only
    s.finish(a)
    out = run_step(s)
    assert b.num_cached_tokens == 4 and out.scheduled[0].num_tokens == 5


def test_config_validation():
    with pytest.raises(ValueError, match="max_step_tokens"):
        SchedulerConfig(max_batch_size=8, max_step_tokens=4)
    with pytest.raises(ValueError, match="max_batch_size"):
        SchedulerConfig(max_batch_size=0)


def test_requests_admitted_together_share_a_prefix_computed_in_that_step():
    s = make(block_size=4, step_tokens=64)
    lore = list(range(500, 512))                           # three full blocks
    a = Sequence(1, lore + [1, 2], 14)
    b = Sequence(2, lore + [3, 4, 5], 15)
    s.add(a)
    s.add(b)
    out = s.schedule_step()
    assert [x.num_tokens for x in out.scheduled] == [14, 3]     # b computes only its own suffix
    assert b.block_table.block_ids[:3] == a.block_table.block_ids[:3]


def test_sequence_whose_fresh_blocks_are_shared_is_not_preempted_in_that_step():
    s = make(num_blocks=8, block_size=4, batch=2, step_tokens=64)
    lore = list(range(500, 512))
    a = Sequence(1, lore + [1], 13, priority=0)
    b = Sequence(2, lore + [2], 13, priority=0)
    s.add(a)
    s.add(b)
    high = Sequence(3, [7, 8, 9], 3, priority=9)
    s.add(high)
    out = s.schedule_step()                                # batch of 2: high and a admitted first
    ids = {x.seq.seq_id for x in out.scheduled}
    assert 3 in ids
    # Whatever was preempted, no scheduled sequence reads a block another sequence will not write.
    scheduled = [x.seq for x in out.scheduled]
    for x in scheduled:
        for block_id in x.block_table.block_ids:
            assert s.blocks.blocks[block_id].ref_count >= 1


def test_preempting_a_scheduled_sequence_withdraws_its_fresh_blocks():
    s = make(num_blocks=6, block_size=4, batch=4, step_tokens=64)
    low = Sequence(1, list(range(100, 108)), 8, priority=0)
    s.add(low)
    s.schedule_step()                                      # (this step is dropped: low stays uncomputed
    s.on_step_done(SchedulerOutput())                      #  and is scheduled, publishing, again below)
    high = Sequence(2, list(range(200, 220)), 20, priority=5)
    s.add(high)
    out = s.schedule_step()                                # high needs 5 blocks: low, scheduled, is preempted
    assert low in out.preempted and [x.seq for x in out.scheduled] == [high]
    assert s.blocks.match_prefix(low.token_ids) == []      # nothing low published survives unwritten


def test_schedule_ahead_only_when_schedule_step_would_pick_the_same_decodes():
    s = make(num_blocks=8, block_size=4, batch=2)
    a, b = seq(1, 3), seq(2, 3)
    s.add(a)
    s.add(b)
    out = s.schedule_step()                      # both prefilled: their first tokens are being sampled
    s.on_step_done(out)
    batch = [a, b]
    ahead = s.schedule_ahead(batch, batch)
    assert [x.seq for x in ahead.scheduled] == batch and all(x.samples and x.num_tokens == 1 for x in ahead.scheduled)
    assert a.num_computed_tokens == 3            # nothing counted before the sampled tokens are in
    for q, t in ((a, 11), (b, 12)):
        q.token_ids.append(t)
    s.commit_ahead(ahead)
    assert a.num_computed_tokens == 4 and b.num_computed_tokens == 4
    assert a.block_table.num_hashed == 1        # its first block (tokens 0-3) is full and published
    # A request waiting for room it could get: no step ahead (schedule_step must admit it first).
    c = seq(3, 2)
    s.add(c)
    assert s.schedule_ahead(batch, [a]) is None
    # The batch is full and the waiting one outranks nobody: the same decodes, ahead.
    assert s.schedule_ahead(batch, batch) is not None
    # A waiting request of higher priority would preempt: no step ahead.
    s.add(seq(4, 2, priority=5))
    assert s.schedule_ahead(batch, batch) is None


def test_schedule_ahead_refuses_when_blocks_are_short_or_a_prefill_runs():
    s = make(num_blocks=2, block_size=4, batch=2)
    a = seq(1, 4)
    s.add(a)
    s.on_step_done(s.schedule_step())           # 4 tokens: one full block; the next token needs a second
    a.token_ids.append(5)
    s.on_step_done(s.schedule_step())
    b = seq(2, 3)
    s.add(b)
    assert s.schedule_ahead([a], [a]) is None    # b waits with room to be admitted
    s2 = make(num_blocks=1, block_size=4, batch=1)
    c = seq(1, 4)
    s2.add(c)
    s2.on_step_done(s2.schedule_step())
    assert s2.schedule_ahead([c], [c]) is None   # its next token needs a block there is not
    assert len(c.block_table.block_ids) == 1


# ------------------------------------------------------------------------------------------ step-time budget
def fitted(fixed_s=0.002, per_prefill=20e-6, per_decode=300e-6, per_kv=2e-9):
    """A cost model fitted to steps of a known cost (plus a few outliers it must shrug off)."""
    from gllm.scheduler.step_cost import StepCostModel, StepShape
    model = StepCostModel()
    shapes = [StepShape(p, d, k) for p in (0, 16, 64, 256, 512) for d in (0, 2, 4, 8) for k in (0, 4000, 60000)]
    for i, sh in enumerate(shapes):
        t = fixed_s + per_prefill * sh.prefill_tokens + per_decode * sh.decode_rows + per_kv * sh.kv_tokens
        model.observe(sh, t * (25 if i % 17 == 0 else 1))   # every 17th step slowed by something else
    model.fit()
    return model


def test_the_cost_model_recovers_step_costs_despite_outliers():
    from gllm.scheduler.step_cost import StepShape
    model = fitted()
    c = model.as_dict()
    assert c["fixed"] == pytest.approx(0.002, rel=0.02) and c["per_prefill_token"] == pytest.approx(20e-6, rel=0.02)
    assert c["per_decode_row"] == pytest.approx(300e-6, rel=0.02) and c["per_kv_token"] == pytest.approx(2e-9, rel=0.05)
    assert model.predict(StepShape(100, 3, 1000)) == pytest.approx(0.002 + 0.002 + 0.0009 + 2e-6, rel=0.02)
    assert model.largest_within(0.005, 1000, lambda n: StepShape(n, 0, 0)) in (149, 150)   # (5 - 2) ms / 20 us


def test_steps_that_shared_the_device_with_the_game_teach_only_an_unfitted_cost_model():
    from gllm.scheduler.step_cost import StepCostModel, StepShape
    model = fitted()
    before = model.as_dict()
    for i in range(64):   # window steps that ran on into the game's render: four times their own time
        sh = StepShape(0, 1 + i % 8, 4000 * (i % 3))
        model.observe(sh, 4 * (0.002 + 300e-6 * sh.decode_rows + 2e-9 * sh.kv_tokens), shared=True)
    assert model.as_dict() == before and model.observed == 60
    model.observe(StepShape(0, 4, 0), 0.0032)   # one that fitted its window is learned
    assert model.observed == 61
    cold = StepCostModel(min_steps=8, refit_every=8)
    for i in range(8):   # unfitted, it learns from them all the same: else it might never be fitted
        cold.observe(StepShape(0, 1 + i, 0), 0.002 + 300e-6 * (1 + i), shared=True)
    assert cold.ready and cold.as_dict()["per_decode_row"] == pytest.approx(300e-6, rel=0.05)


def test_a_step_budget_splits_a_long_prompt_and_decodes_still_get_a_token_every_step():
    budget_s = 0.006
    model = fitted()
    s = Scheduler(SchedulerConfig(4, 512, step_budget_s=budget_s), BlockManager(1024, 16, True), model)
    decoders = [seq(i, 5) for i in (1, 2, 3)]
    for q in decoders:
        s.add(q)
    run_step(s)                                            # all three prefilled: now decoding
    long = seq(9, 2000)
    s.add(long)
    steps = 0
    while long.num_computed_tokens < 2000:
        out = run_step(s)
        steps += 1
        tokens = {x.seq.seq_id: x.num_tokens for x in out.scheduled}
        assert all(tokens[q.seq_id] == 1 for q in decoders)  # every running decode, every step
        assert model.predict(out.shape) <= budget_s + 1e-9, out.shape
        assert steps < 200
    assert steps > 2000 // 512 + 1                         # more, smaller chunks than the token budget alone


def least_piece(model) -> dict[int, int]:
    s = Scheduler(SchedulerConfig(4, 512, step_budget_s=0.001), BlockManager(1024, 16, True), model)
    s.add(seq(1, 3))
    run_step(s)
    s.add(seq(2, 400))
    out = run_step(s)                                      # 2 ms fixed alone is over the 1 ms budget
    return {x.seq.seq_id: x.num_tokens for x in out.scheduled}


def test_decodes_that_fill_the_budget_still_leave_a_minimum_prefill():
    """Long prompts keep moving: at least MIN_PREFILL_CHUNK tokens, and more while a step of more is predicted to
    cost at most a quarter more — on a CPU (each prompt token real work) about the minimum, on a GPU (a step of
    a hundred tokens costs what one of sixteen does) a larger piece, up to LEAST_PIECE_MAX."""
    from gllm.scheduler.scheduler import LEAST_PIECE_MAX, LEAST_PIECE_SLACK, MIN_PREFILL_CHUNK
    cpu = least_piece(fitted(per_prefill=2e-3))            # 2 ms a prompt token: 16 cost 34 ms, 20 cost 42 ms
    assert cpu[1] == 1 and cpu[2] == int((LEAST_PIECE_SLACK * (2.3 + 2 * MIN_PREFILL_CHUNK) - 2.3) / 2)
    gpu = least_piece(fitted(per_prefill=1e-6))            # 1 us a prompt token
    assert gpu == {1: 1, 2: LEAST_PIECE_MAX}


def test_a_high_priority_arrival_into_a_full_batch_gets_its_first_token_within_two_steps():
    s = make(batch=4, step_tokens=64, num_blocks=256)
    low = [seq(i, 20, priority=0) for i in range(1, 5)]
    for q in low:
        s.add(q)
    for _ in range(3):
        run_step(s)                                 # the batch is full of decoding low-priority NPCs
    assert len(s.running) == 4 and all(not q.is_prefilling for q in low)
    facing = seq(9, 40, priority=10)                # the NPC the player talks to
    s.add(facing)
    first_token_step = None
    for step in range(1, 3):
        out = run_step(s)
        if any(x.seq is facing and x.samples for x in out.scheduled):
            first_token_step = step
            break
    assert first_token_step is not None and first_token_step <= 2
    assert facing in s.running and sum(q.num_preemptions for q in low) == 1   # one low NPC made room


def test_a_paced_sequence_sits_out_the_steps_before_its_next_token_is_due():
    s = make(batch=4, step_tokens=64)
    paced, free = seq(1, 6), seq(2, 6)
    paced.token_interval = 0.125                     # 8 tokens a second (binary fractions: exact times)
    s.add(paced)
    s.add(free)
    assert {x.seq.seq_id for x in run_step(s, now=0.0).scheduled} == {1, 2}   # prefill: never held back
    assert paced.next_token_at == 0.125
    decoded_at = []
    for i in range(1, 65):                           # steps every 1/64 s for a second
        now = i / 64
        out = run_step(s, now=now)
        assert any(x.seq is free for x in out.scheduled)                  # the unpaced one decodes every step
        if any(x.seq is paced for x in out.scheduled):
            decoded_at.append(now)
        else:
            assert s.seconds_until_due(now) == pytest.approx(paced.next_token_at - now)
    assert decoded_at == [0.125 * k for k in range(1, 9)]                 # exactly on the pace, no drift
    assert s.seconds_until_due(1.0) == 0.125


def test_a_late_paced_token_is_caught_up_without_a_burst():
    s = make()
    paced = seq(1, 6)
    paced.token_interval = 0.1
    s.add(paced)
    run_step(s, now=0.0)
    # Steps of 70 ms: a token due at 0.1 comes at 0.14; the next may come early (0.2 is due: 0.21).
    times = [t for t in (0.07, 0.14, 0.21, 0.28, 0.35, 0.42) if run_step(s, now=t).scheduled]
    assert times == [0.14, 0.21, 0.35, 0.42]         # 4 tokens in 0.42 s, as the pace asks: no drift
    # After a long gap (nothing scheduled for 2 s): one catch-up token in the next step, then the pace again.
    assert run_step(s, now=2.5).scheduled and run_step(s, now=2.52).scheduled
    assert not run_step(s, now=2.54).scheduled and s.seconds_until_due(2.54) == pytest.approx(0.06)


def test_schedule_ahead_leaves_a_paced_sequence_to_schedule_step():
    s = make()
    a, b = seq(1, 4), seq(2, 4)
    b.token_interval = 0.5
    s.add(a)
    s.add(b)
    run_step(s, now=0.0)
    assert s.schedule_ahead([a, b], [a, b], now=0.01) is None        # b is not due before 0.5
    assert s.schedule_ahead([a, b], [a, b], now=0.6) is not None


def test_earliest_ttft_deadline_is_admitted_first_within_a_priority():
    s = make(batch=1)
    late, urgent, important = seq(1, 4), seq(2, 4), seq(3, 4, priority=1)
    late.deadline, urgent.deadline = 5.0, 1.0       # urgent arrived later but is wanted sooner
    s.add(late)
    s.add(urgent)
    assert [x.seq for x in run_step(s, now=0.0).scheduled] == [urgent]
    s.finish(urgent)
    s.add(important)                                 # priority still comes before deadlines
    assert [x.seq for x in run_step(s, now=0.1).scheduled] == [important]


def test_a_budget_set_before_the_cost_model_has_learned_caps_a_steps_prefill():
    from gllm.scheduler.scheduler import UNFITTED_PREFILL_TOKENS
    from gllm.scheduler.step_cost import StepCostModel
    s = Scheduler(SchedulerConfig(4, 512), BlockManager(256, 4, True), StepCostModel())
    long = seq(1, 400)
    s.add(long)
    assert run_step(s).scheduled[0].num_tokens == 400     # no budget: the whole prompt in one step
    s2 = Scheduler(SchedulerConfig(4, 512), BlockManager(256, 4, True), StepCostModel())
    s2.step_budget_s = 0.008           # set at run time (the frame governor does)
    s2.add(seq(2, 400))
    s2.add(seq(3, 400))
    out = run_step(s2)
    assert [x.num_tokens for x in out.scheduled] == [UNFITTED_PREFILL_TOKENS]   # one step's prefill, in all

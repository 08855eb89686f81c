"""Computing in the game's idle phase: the window bookkeeping (explicit time), the scheduler's strict budget
inside a window (rows that do not fit take turns), the engine launching steps only inside reported windows,
and the bridge's `idle` message reaching a real server."""

from __future__ import annotations

import threading
import time

import pytest
from test_scheduler import fitted, run_step, seq

from gllm.engine.compute_windows import ComputeWindows, WindowConfig
from gllm.kv import BlockManager
from gllm.scheduler import Scheduler, SchedulerConfig


def test_a_window_gives_a_shrinking_budget_and_none_once_reports_stop():
    w = ComputeWindows(WindowConfig(share=0.5, margin_s=0.001, stale_s=0.1))
    assert w.budget_s(0.0) is None and not w.active(0.0)        # nobody reports: compute freely
    w.open("game", 0.010, now=1.0)
    assert w.budget_s(1.0) == pytest.approx(0.010 * 0.5 - 0.001)
    assert w.budget_s(1.004) == pytest.approx(0.006 * 0.5 - 0.001)
    assert w.budget_s(1.010) == 0.0 and w.budget_s(1.05) == 0.0   # closed, still reporting: wait
    assert w.budget_s(1.2) is None                              # stale: no game asks any more
    w.open("game", 5.0, now=2.0)
    assert w.budget_s(2.0) == pytest.approx(1.0 * 0.5 - 0.001)  # a window is at most max_window_s
    with pytest.raises(ValueError):
        WindowConfig(share=0.0)


def test_several_sources_compute_only_where_their_windows_overlap():
    w = ComputeWindows(WindowConfig(share=1.0, margin_s=0.0))
    w.open("a", 0.008, now=0.0)
    w.open("b", 0.003, now=0.001)
    assert w.budget_s(0.001) == pytest.approx(0.003)
    w.forget("b")
    assert w.budget_s(0.001) == pytest.approx(0.007)


def with_prefill_steps(extra_s: float = 0.001):
    """Steps of fitted()'s costs, where any step with prompt tokens costs `extra_s` more (eager launches)."""
    from gllm.scheduler.step_cost import StepCostModel, StepShape
    model = StepCostModel()
    for p in (0, 16, 64, 256):
        for d in (0, 2, 4, 8):
            for k in (0, 4000, 60000):
                model.observe(StepShape(p, d, k), 0.002 + 20e-6 * p + 300e-6 * d + 2e-9 * k + extra_s * (p > 0))
    model.fit()
    assert model.as_dict()["per_prefill_step"] == pytest.approx(extra_s, rel=0.01)
    return model


def strict(budget_s: float, rows: int, guarantee: bool = False, model=None) -> tuple[Scheduler, list]:
    s = Scheduler(SchedulerConfig(8, 512), BlockManager(1024, 16, True), model or fitted())
    decoders = [seq(i, 5) for i in range(1, rows + 1)]
    for q in decoders:
        s.add(q)
    run_step(s)                                  # all prefilled: decoding
    s.step_budget_s, s.strict_budget, s.guarantee_progress = budget_s, True, guarantee
    return s, decoders


def test_inside_a_window_only_the_decode_rows_that_fit_run_and_the_rest_take_turns():
    # fitted(): 2 ms a step + 0.3 ms a decode row, so 3.0 ms holds three of the six rows.
    s, decoders = strict(0.0030, rows=6)
    served = []
    for _ in range(4):
        out = run_step(s)
        assert len(out.scheduled) == 3 and s.cost.predict(out.shape) <= 0.0030 + 1e-9
        served.append({x.seq.seq_id for x in out.scheduled})
    assert served[0] | served[1] == {1, 2, 3, 4, 5, 6} and served[2] == served[0]   # turns, nobody starves
    s.strict_budget = False                      # outside windows every row decodes every step, as before
    assert len(run_step(s).scheduled) == 6


def test_a_window_too_small_for_any_row_computes_nothing_except_its_first_step():
    s, _ = strict(0.0010, rows=2)                # less than one step's fixed 2 ms
    assert run_step(s).scheduled == []
    long = seq(9, 300)
    s.add(long)
    assert run_step(s).scheduled == []           # no minimum prefill chunk either
    s.guarantee_progress = True                  # a window's first step: its least progress, one row
    out = run_step(s)
    assert len(out.scheduled) == 1


def test_a_window_alternates_its_forced_progress_between_running_and_waiting_requests():
    """With a window no step fits, the running rows cannot keep a new request out: the forced first step of
    each window goes to the running and the waiting in turn; and a prefill that does not fit never blocks a
    decode row that does."""
    s, decoders = strict(0.0010, rows=2, guarantee=True, model=with_prefill_steps())
    newcomer = seq(9, 400)
    s.add(newcomer)
    firsts = []
    for _ in range(4):
        out = run_step(s)
        assert len(out.scheduled) == 1
        firsts.append(out.scheduled[0].seq.seq_id)
    assert 9 in firsts and any(f in (1, 2) for f in firsts)
    assert newcomer.num_computed_tokens > 0
    s.guarantee_progress = False
    assert newcomer.is_prefilling and newcomer.last_step < min(d.last_step for d in decoders)   # first in turn
    s.step_budget_s = 0.0025                     # room for one decode row (2.3 ms), not for a prefill (3 ms + )
    out = run_step(s)
    assert [(x.seq.seq_id, x.num_tokens) for x in out.scheduled] in ([(1, 1)], [(2, 1)])


def test_on_a_gpu_a_windows_forced_step_decodes_every_due_row_and_still_alternates_with_admissions():
    """A GPU's decode step reads the weights once for all its rows: the window's forced step (no step fits)
    decodes the whole batch there, not one row; prompts still get every other window, and the steps after a
    window's first stay strict."""
    s, _ = strict(0.0010, rows=4, guarantee=True, model=with_prefill_steps())
    s.config = SchedulerConfig(8, 512, forced_step_decodes_all=True)
    assert {x.seq.seq_id for x in run_step(s).scheduled} == {1, 2, 3, 4}
    newcomer = seq(9, 400)
    s.add(newcomer)
    shapes = [[(x.seq.seq_id, x.num_tokens) for x in run_step(s).scheduled] for _ in range(4)]
    prompt_steps = [sh for sh in shapes if any(i == 9 for i, _ in sh)]
    assert len(prompt_steps) == 2 and all(len(sh) == 1 for sh in prompt_steps)   # a piece of the prompt alone
    assert sum(sorted(i for i, _ in sh) == [1, 2, 3, 4] for sh in shapes) == 2    # the whole batch, in turn
    s.guarantee_progress = False
    assert run_step(s).scheduled == []           # not the window's first step: nothing fits


def test_on_a_gpu_a_full_batch_decodes_whole_in_every_window_while_requests_wait_for_a_place():
    """With the batch full, the windows whose forced progress would go to the waiting admit nobody: they decode
    the whole batch too (not the one row a strict budget lets through); the first window after a row ends
    admits the next request."""
    s = Scheduler(SchedulerConfig(4, 512, forced_step_decodes_all=True), BlockManager(1024, 16, True),
                  with_prefill_steps())
    decoders = [seq(i, 5) for i in range(1, 5)]
    for q in decoders:
        s.add(q)
    run_step(s)
    s.step_budget_s, s.strict_budget, s.guarantee_progress = 0.0010, True, True
    waiting = [seq(i, 40) for i in (8, 9)]
    for q in waiting:
        s.add(q)
    for _ in range(6):
        assert sorted(x.seq.seq_id for x in run_step(s).scheduled) == [1, 2, 3, 4]
    s.finish(decoders[0])
    shapes = [sorted(x.seq.seq_id for x in run_step(s).scheduled) for _ in range(2)]
    assert shapes == [[8], [2, 3, 4, 8]]          # the place goes to a waiting request, which then decodes too


@pytest.fixture
def tiny_engine(llama32_dir):
    from gllm.engine import GeneratorParams, LLMEngine
    params = GeneratorParams(max_seq_len=2048, kv_cache_tokens=4096, max_batch_size=4, cpu_threads=1,
                             dtype="float32")
    with LLMEngine(llama32_dir, params, device="cpu") as eng:
        yield eng


def test_the_engine_starts_steps_only_inside_the_windows_a_game_reports(tiny_engine):
    """A game thread says every 60 ms that the next 20 ms are free; the engine's steps all start inside those
    windows, requests still finish, and once the reports stop it computes freely again."""
    from gllm.engine import GenerationRequest
    eng = tiny_engine
    windows: list[tuple[float, float]] = []
    starts: list[float] = []
    eng.add_step_listener(lambda info: starts.append(info.started))
    stop = threading.Event()

    def game() -> None:
        while not stop.is_set():
            opened = time.perf_counter()
            eng.report_idle(20.0, source="test-game")
            windows.append((opened, opened + 0.020))
            time.sleep(0.060)

    player = threading.Thread(target=game)
    player.start()
    try:
        time.sleep(0.15)
        handles = [eng.submit(GenerationRequest(prompt=p, max_new_tokens=24, ignore_eos=True))
                   for p in ("The gate", "A dragon sleeps", "Bread costs")]
        results = [h.result(timeout=120) for h in handles]
    finally:
        stop.set()
        player.join()
    assert all(r.finish_reason == "length" and len(r.tokens) == 24 for r in results)
    assert starts
    outside = [t for t in starts if not any(a <= t <= b for a, b in windows)]
    assert not outside, f"{len(outside)} of {len(starts)} steps started outside the game's windows"
    stats = eng.stats()
    # it yielded to the game: waited between steps, or paused a step between layers for the next window
    assert stats["window_steps"] == len(starts) and stats["window_waits"] + stats["layer_pauses"] > 0
    assert stats["window_reports"] >= 3
    time.sleep(0.15)                               # reports stale: free again
    before = eng.stats()["window_steps"]
    again = eng.generate([GenerationRequest(prompt="Free", max_new_tokens=5, ignore_eos=True)], timeout=60)[0]
    assert again.finish_reason == "length" and eng.stats()["window_steps"] == before
    with pytest.raises(ValueError, match="report_idle"):
        eng.report_idle(-1.0)
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_a_governor_pause_forces_no_step_into_the_window_it_ran_into(tiny_engine, monkeypatch):
    """A window's first step is forced (its least progress) because a new window has just begun. A governor
    pause ends anywhere in the game's frame: the window it ran into is no new one, and its steps must fit."""
    eng = tiny_engine
    eng.report_idle(50.0, source="test-game")
    assert eng._window_allows_step() and eng.scheduler.guarantee_progress        # a new window
    assert eng._window_allows_step() and not eng.scheduler.guarantee_progress    # the same one
    monkeypatch.setattr(eng.governor, "update", lambda now: 0.5)                 # frames over: governing
    monkeypatch.setattr(eng.governor, "pause_after", lambda step_s: 0.05)
    reporter = threading.Timer(0.01, lambda: eng.report_idle(50.0, source="test-game"))
    reporter.start()                                                             # the game's next window
    eng._yield_to_the_game(0.001)                                                # opens during the pause
    reporter.join()
    assert eng.paused_s >= 0.05
    assert eng._window_allows_step() and not eng.scheduler.guarantee_progress
    eng.report_idle(50.0, source="test-game")                                    # the one after: new
    assert eng._window_allows_step() and eng.scheduler.guarantee_progress


def test_a_bridge_client_sending_idle_windows_paces_a_real_server(llama32_dir):
    """Over real sockets: `idle` messages reach the engine of a real `gllm serve` (steps then run in the
    windows), a reply still completes, and a bad `idle` gets bad_request without harming the session."""
    from gllm.bridge import protocol as P
    from gllm.bridge.client import BridgeClient, Done, Error

    from bridge_doubles import ServerProcess
    with ServerProcess(llama32_dir, "--cpu-threads", "1") as srv:
        with BridgeClient(srv.endpoint) as c:
            c.connect()
            rid = c.generate("Once upon a time", max_tokens=12, ignore_eos=True)
            done = None
            deadline = time.monotonic() + 120
            while done is None:
                assert time.monotonic() < deadline
                c.idle(25.0)
                done = next((e for e in c.poll(40) if isinstance(e, Done) and e.id == rid), None)
            assert done.finish_reason == "length"
            stats = c.stats()
            assert stats["window_reports"] > 0 and stats["window_steps"] > 0, stats
            c._send({"op": "idle", "ms": -3.0})
            deadline = time.monotonic() + 30
            errors: list = []
            while not errors:
                assert time.monotonic() < deadline
                errors = [e for e in c.poll(200) if isinstance(e, Error)]
            assert errors[0].code == P.BAD_REQUEST and "ms" in errors[0].message
            again = c.generate("Free again", max_tokens=4, ignore_eos=True)
            assert c.wait(again, timeout_s=60).finish_reason == "length"


def test_waiting_for_the_next_report_ends_at_a_report_or_the_timeout():
    w = ComputeWindows()
    seen = w.reports
    started = time.perf_counter()
    assert not w.wait_for_report(seen, 0.05) and time.perf_counter() - started >= 0.04
    opener = threading.Timer(0.02, lambda: w.open("game", 0.005, time.monotonic()))
    opener.start()
    assert w.wait_for_report(seen, 10.0) and w.reports == seen + 1
    opener.join()
    assert w.wait_for_report(seen, 0.0)             # a report since `seen` already came: no wait


def test_a_cpu_step_pauses_between_layers_for_the_next_window_and_computes_the_same_tokens(smollm2_gguf):
    """The default model's step (30 layers, ~20 ms on one thread) inside 2 ms windows every 6 ms: it pauses
    between layers until the game's next window instead of running through the game's frame, and its tokens
    are those it computes without windows; with layer pauses off it does not pause."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    def run(layer_pauses: bool) -> tuple[list[int], list[int], dict]:
        params = GeneratorParams(max_seq_len=512, kv_cache_tokens=1024, max_batch_size=2, cpu_threads=1,
                                 dtype="float32", layer_pauses=layer_pauses)
        request = GenerationRequest(prompt="The gate of the old castle", max_new_tokens=6, temperature=0,
                                    ignore_eos=True, cache_result=False)
        with LLMEngine(smollm2_gguf, params, device="cpu") as eng:
            free = eng.generate([request], timeout=120)[0].tokens
            stop = threading.Event()

            def game() -> None:
                while not stop.is_set():
                    eng.report_idle(2.0, source="test-game")
                    time.sleep(0.006)

            player = threading.Thread(target=game)
            player.start()
            try:
                windowed = eng.generate([request], timeout=120)[0].tokens
            finally:
                stop.set()
                player.join()
            return free, windowed, eng.stats()

    free, windowed, stats = run(layer_pauses=True)
    assert windowed == free and len(free) == 6
    assert stats["window_steps"] >= 6 and stats["layer_pauses"] > 0 and stats["layer_pause_ms"] > 0
    free, windowed, stats = run(layer_pauses=False)
    assert windowed == free and stats["window_steps"] >= 6 and stats["layer_pauses"] == 0

"""The engine's compute threads run at a lower OS priority than the game's when compute_nice is set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def thread_nices() -> dict[int, int]:
    """tid -> nice of every thread of this process (field 19 of /proc/self/task/TID/stat)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):   # a thread that ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = int(fields[16])
    return out


def test_engine_threads_get_the_lower_priority_and_the_callers_keep_theirs(llama32_dir):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(thread_nices())
    params = GeneratorParams(max_seq_len=128, max_batch_size=2, cpu_threads=2, compute_nice=5, dtype="float32")
    with LLMEngine(llama32_dir, params, device="cpu") as eng:
        eng.generate([GenerationRequest(prompt="Once upon a time " * 8, max_new_tokens=8, temperature=0)])
        nices = thread_nices()
        new = {tid: n for tid, n in nices.items() if tid not in before}
        assert eng.thread_priority == f"nice {min(19, base + 5)}"
        assert nices[os.getpid()] == base                              # the caller's (the game's) thread
        lowered = [tid for tid, n in new.items() if n == min(19, base + 5)]
        assert len(lowered) >= 2, new         # the engine thread and the compute thread it started


def test_compute_idle_puts_the_engine_threads_in_the_idle_class(llama32_dir):
    before = set(thread_nices())
    params = GeneratorParams(max_seq_len=128, max_batch_size=2, cpu_threads=2, compute_idle=True, dtype="float32")
    with LLMEngine(llama32_dir, params, device="cpu") as eng:
        eng.generate([GenerationRequest(prompt="Once upon a time " * 8, max_new_tokens=8, temperature=0)])
        policies = {}
        for tid in set(thread_nices()) - before:
            try:
                policies[tid] = os.sched_getscheduler(tid)
            except ProcessLookupError:    # a thread that ended while we looked
                pass
        assert eng.thread_priority == "idle class (SCHED_IDLE)"
        assert os.sched_getscheduler(0) != os.SCHED_IDLE                # the caller's (the game's) thread
        idle = [tid for tid, policy in policies.items() if policy == os.SCHED_IDLE]
        assert len(idle) >= 2, policies       # the engine thread and the compute thread it started


def test_compute_nice_is_checked():
    with pytest.raises(ValueError, match="compute_nice"):
        GeneratorParams(compute_nice=40)
    with pytest.raises(ValueError, match="compute_idle"):
        GeneratorParams(compute_idle="yes")


def test_a_server_lowers_its_engine_by_default(llama32_dir):
    from gllm.bridge.client import BridgeClient

    from bridge_doubles import ServerProcess
    with ServerProcess(llama32_dir, "--max-seq-len", "128", "--cpu-threads", "2") as srv:
        with BridgeClient(srv.endpoint) as c:
            c.connect()
            c.wait(c.generate("Once upon a time " * 8, max_tokens=4))
        base = os.getpriority(os.PRIO_PROCESS, srv.proc.pid)
        nices = []
        for task in Path(f"/proc/{srv.proc.pid}/task").iterdir():
            stat = (task / "stat").read_text()
            nices.append(int(stat[stat.rindex(")") + 2:].split()[16]))
        assert nices.count(min(19, base + 10)) >= 2 and base in nices, nices   # engine + its workers; the rest

"""Lower the OS scheduling priority of the calling thread, so the game's threads come first when cores are short.

Call it on the engine thread before its first tensor operation: the compute threads it then starts (torch's
OpenMP pool belongs to the thread that first runs a parallel region) inherit the lower priority, while the
caller's other threads (the game's) keep theirs. Linux: the thread's nice value (per thread there); Windows: a
below-normal thread priority; elsewhere nothing (the result says so).

`idle` goes further: the OS's idle class (Linux `SCHED_IDLE`, Windows `THREAD_PRIORITY_IDLE`), where a thread
runs only on a core no other thread wants, whatever its nice value: the game's threads always go first.
"""

from __future__ import annotations

import os
import sys
import threading


def lower_this_thread(nice: int, idle: bool = False) -> str:
    """Raise this thread's nice value by `nice` (0: leave it), or with `idle` put it in the idle scheduling
    class; returns what was done, for the log and stats."""
    if idle:
        return _idle_class()
    if nice <= 0:
        return "unchanged"
    if sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        os.setpriority(os.PRIO_PROCESS, tid, target)
        return f"nice {target}"
    if sys.platform == "win32":
        import ctypes
        kernel32 = ctypes.windll.kernel32                      # type: ignore[attr-defined]
        level = -2 if nice >= 10 else -1                        # THREAD_PRIORITY_LOWEST / BELOW_NORMAL
        kernel32.SetThreadPriority(kernel32.GetCurrentThread(), level)
        return "below-normal thread priority" if level == -1 else "lowest thread priority"
    return f"unchanged ({sys.platform} has no per-thread priority here)"


def _idle_class() -> str:
    if sys.platform.startswith("linux"):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
        return "idle class (SCHED_IDLE)"
    if sys.platform == "win32":
        import ctypes
        kernel32 = ctypes.windll.kernel32                      # type: ignore[attr-defined]
        kernel32.SetThreadPriority(kernel32.GetCurrentThread(), -15)   # THREAD_PRIORITY_IDLE
        return "idle thread priority"
    return f"unchanged ({sys.platform} has no idle class here)"

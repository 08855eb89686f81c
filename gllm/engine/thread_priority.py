"""Lower the OS scheduling priority of the calling thread, so the game's threads come first when cores are short.

Call it on the engine thread before its first tensor operation: the compute threads it then starts (torch's
OpenMP pool belongs to the thread that first runs a parallel region) inherit the lower priority, while the
caller's other threads (the game's) keep theirs. Linux: the thread's nice value (per thread there); Windows: a
below-normal thread priority; elsewhere nothing (the result says so).
"""

from __future__ import annotations

import os
import sys
import threading


def lower_this_thread(nice: int) -> str:
    """Raise this thread's nice value by `nice` (0: leave it); returns what was done, for the log and stats."""
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

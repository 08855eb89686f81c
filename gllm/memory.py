"""Giving freed memory back to the OS.

A huge prompt is read, parsed and tokenized by several threads; glibc keeps what they freed in per-thread
arenas, so the process's RSS stays at its peak long after the request is gone. `malloc_trim` returns the
free pages of every arena. Called after the rare large request, not per request (it walks the heap).
"""

from __future__ import annotations

import ctypes
import sys

LARGE_TEXT_CHARS = 1 << 16      # requests with at least this much text (or body bytes) are followed by a trim


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc only); False where there is no `malloc_trim`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):     # musl and others have none
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True

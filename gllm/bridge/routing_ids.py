"""Unpredictable ROUTER routing ids.

libzmq gives every peer that does not claim an identity the id ``00`` + a 32-bit counter, and starts the
counter at ``rand()`` when the ROUTER is created. Nothing seeds ``rand()`` before that in a Python process
(measured with pyzmq's libzmq 4.3.5: the first id is always ``00 6b 8b 45 67``, glibc's first ``rand()``,
then ``00 6b 8b 45 68``...). A peer may also claim any identity in its READY command; libzmq checks a
claimed id against the ids in use, but never checks a generated id against claimed ones: when the counter
reaches an id a peer has claimed, `add_out_pipe` fails an assertion and the whole process aborts.

Seeding ``rand()`` from the OS before the ROUTER exists makes the counter's start unknown to peers (a
generated id is never sent to anyone), so a claim can no longer be aimed at the next id: each id a peer
holds hits with odds of 1 in 2**32 per id generated. What libzmq offers goes no further (no option refuses
claimed ids, and the docs' "ids starting with a zero byte are reserved" is not enforced); the remaining
brute force (about 2**32 / N connections while holding N claimed ids) is libzmq's to close.
"""

from __future__ import annotations

import ctypes
import os
import sys


def seed_libc_rand() -> bool:
    """Seed the C library's ``rand()`` (glibc: the same state as ``random()``) from ``os.urandom``.

    Call it before creating a ROUTER socket. Returns False where the C library cannot be reached (Windows,
    whose C runtimes keep ``rand()`` state per runtime and thread)."""
    if sys.platform == "win32":
        return False
    try:
        libc = ctypes.CDLL(None)          # the C library the process (and libzmq) already uses
        srand = libc.srand
    except (OSError, AttributeError):
        return False
    srand.argtypes, srand.restype = [ctypes.c_uint], None
    srand(int.from_bytes(os.urandom(4), "little"))
    return True

"""The kernels behind `gllm.ops.stream_gate.StreamGate`: one program waits for a pinned word, then many copy
(the first read of a host word costs each program ~5 µs, one after another: 63 programs that all polled took
0.28 ms to copy 256 KB, one poller and 63 copiers 0.03 ms)."""

from __future__ import annotations

import triton
import triton.language as tl


# One compile for every ticket, size and timeout: a kernel compiled (and so loaded) behind a shut gate would
# wait for the device, which waits for the gate (CUDA's lazy loading).
@triton.jit(do_not_specialize=["ticket", "max_polls"])
def wait_for_ticket(flag_ptr, ticket, late_ptr, max_polls):
    """One program: poll flag_ptr[0] (pinned host memory) until it reaches `ticket`, or `max_polls` reads (each
    a round trip over the bus) have found it short; then late_ptr[0] (device) = 0 if it did, else 1, and
    flag_ptr[1] = ticket."""
    seen = tl.load(flag_ptr, volatile=True)
    polls = 1
    while ((seen - ticket) < 0) & (polls < max_polls):   # int32 difference: cyclic across a wrap
        seen = tl.load(flag_ptr, volatile=True)
        polls += 1
    opened = (seen - ticket) >= 0
    tl.store(late_ptr, tl.where(opened, 0, 1))
    if not opened:
        tl.store(flag_ptr + 1, ticket)


@triton.jit(do_not_specialize=["n_words"])
def copy_unless_late(late_ptr, src_ptr, dst_ptr, n_words, BLOCK: tl.constexpr):
    """dst = src (pinned host memory, read fresh now), or all-ones words if the wait before timed out (src may
    be half written then)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_words
    if tl.load(late_ptr) == 0:
        words = tl.load(src_ptr + offs, mask=inside, other=0, cache_modifier=".cv")
    else:
        words = tl.full([BLOCK], -1, tl.int32)
    tl.store(dst_ptr + offs, words, mask=inside)

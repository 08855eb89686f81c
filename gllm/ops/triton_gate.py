"""The kernel behind `gllm.ops.stream_gate.StreamGate`: wait for a pinned word, then copy host words in."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["ticket"])   # one compile for every ticket
def copy_when_open(flag_ptr, ticket, src_ptr, dst_ptr, n_words, max_polls, BLOCK: tl.constexpr):
    """Every program polls flag_ptr[0] until it reaches `ticket` (or `max_polls` reads, each a round trip over
    the bus, have found it short), then copies its block of src (pinned host memory) to dst; after a timeout it
    writes all-ones and program 0 stores `ticket` in flag_ptr[1]."""
    seen = tl.load(flag_ptr, volatile=True)
    polls = 1
    while ((seen - ticket) < 0) & (polls < max_polls):   # int32 difference: cyclic across a wrap
        seen = tl.load(flag_ptr, volatile=True)
        polls += 1
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n_words
    if (seen - ticket) >= 0:
        words = tl.load(src_ptr + offs, mask=inside, other=0, cache_modifier=".cv")   # fresh from the host
    else:
        words = tl.full([BLOCK], -1, tl.int32)
        if tl.program_id(0) == 0:
            tl.store(flag_ptr + 1, ticket)
    tl.store(dst_ptr + offs, words, mask=inside)

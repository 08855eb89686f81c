"""`StreamGate`: host data that a CUDA stream takes in once the host says it is written, by a store into pinned
memory, so the device work that reads it can be queued before it exists.

The engine queues a constrained step's sampling before its grammar masks are computed: `copy_when_open` queues
a one-program kernel that polls a pinned word until it reaches the gate's ticket, then a kernel that copies the
host buffer into device memory (not the copy engine: the driver may take a small host-to-device copy's data
when it is queued, not when it runs); the mask thread writes the buffer and opens the gate with a plain store
(no CUDA call, any thread). Tickets come from `next_ticket()`; `open(t)` opens every gate up to `t` (a cyclic
comparison: the counter may wrap).

Why not the driver's `cuStreamWaitValue32`: where the GPU driver leaves stream memory operations off (its
default), the wait is emulated on the host and the next launch on the stream blocks the caller until it opens.

A gate that stays shut would hold the stream forever, and with it any host thread that waits for the device
(with CUDA's lazy module loading, even the first launch of a kernel does). So the kernel gives up after about
`timeout_s` (counted in reads of the word): it then records the ticket as late, and the copy writes all-ones
words instead (every token allowed). Masks that are a
superset of the real ones keep a sample exact whenever the token drawn is allowed (the race's winner over all
tokens, if allowed, is its winner over the allowed ones); the engine checks every token against its grammar.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0    # nominal: polls are counted, not timed, and may run faster than POLL_S
POLL_S = 1e-6          # about one read of host memory from the GPU (a bus round trip): polls = timeout / this
BLOCK = 1024            # int32 words a program copies


def _gate_kernels():
    """The Triton kernels (None without Triton)."""
    try:
        from gllm.ops import triton_gate
    except ImportError:
        return None
    return triton_gate


class StreamGate:
    """Gates on the current CUDA stream, opened by host stores into one pinned 32-bit word (a second one
    records the last gate that timed out)."""

    def __init__(self, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.device = device
        self.max_polls = max(1, int(timeout_s / POLL_S))
        self._words = torch.zeros(2, dtype=torch.int32, pin_memory=True)   # [opened up to, last late ticket]
        self._view = self._words.numpy()       # stores go straight to the pinned words
        self._late = torch.zeros(1, dtype=torch.int32, device=device)   # the last gate timed out (stream order)
        self._issued = 0
        self._kernels = _gate_kernels()

    @classmethod
    def create(cls, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> "StreamGate | None":
        """A working gate for `device`, or None (no CUDA, no Triton, or the device cannot read pinned memory)."""
        if device.type != "cuda":
            return None
        gate = cls(device, timeout_s)
        if gate._kernels is None:
            return None
        try:   # an open gate (and the kernel compiled now, not in a step): no risk of waiting
            ticket = gate.next_ticket()
            gate.open(ticket)
            host = torch.arange(3, dtype=torch.int32).pin_memory()
            if not torch.equal(gate.copy_when_open(ticket, host).cpu(), host):
                raise RuntimeError("the copy through the gate differs")
        except Exception as exc:
            log.info("no stream gates on %s (%s): constrained steps are sampled after their masks", device, exc)
            return None
        return gate

    def next_ticket(self) -> int:
        """A new gate's number (not yet queued, not yet open): 1 … 2**32 - 1, then 1 again (0 is the late word's
        "none")."""
        self._issued = self._issued % 0xFFFFFFFF + 1
        return self._issued

    def copy_when_open(self, ticket: int, host: torch.Tensor) -> torch.Tensor:
        """`host` (pinned int32, contiguous) on the device, copied on the current stream once gate `ticket` is
        open; later work on the stream waits for it. All ones (-1) if the gate stays shut past the timeout."""
        out = torch.empty(host.shape, dtype=torch.int32, device=self.device)
        n = host.numel()
        self._kernels.wait_for_ticket[(1,)](self._words, self._as_int32(ticket), self._late, self.max_polls,
                                            num_warps=1)
        self._kernels.copy_unless_late[(max(1, -(-n // BLOCK)),)](self._late, host, out, n, BLOCK=BLOCK, num_warps=4)
        return out

    def open(self, ticket: int) -> None:
        """Open the gates up to `ticket` (from any thread, in increasing order)."""
        self._view[0] = self._as_int32(ticket)

    def was_late(self, ticket: int) -> bool:
        """Whether gate `ticket` timed out (known once the work behind it has run)."""
        return int(self._view[1]) == self._as_int32(ticket)

    @staticmethod
    def _as_int32(ticket: int) -> int:
        return ticket - (1 << 32) if ticket >= 1 << 31 else ticket

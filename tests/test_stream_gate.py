"""gllm.ops.stream_gate on a real CUDA stream, and the engine's constrained steps sampled behind one.

Skipped without CUDA (CI has none); `tools/gpu_check.sh` runs it on a GPU machine.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.ops.stream_gate import StreamGate
from gllm.sampling import Sampler, SampleRow, SamplingParams

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: stream gates are tested by tools/gpu_check.sh on a GPU machine",
                allow_module_level=True)

DEVICE = torch.device("cuda")


@pytest.fixture(scope="module")
def gate():
    g = StreamGate.create(DEVICE)
    if g is None:
        pytest.skip("no stream gate on this device")
    return g


def test_the_copy_behind_a_gate_waits_for_the_host_and_takes_what_it_wrote(gate):
    host = torch.zeros(3000, dtype=torch.int32).pin_memory()
    torch.zeros(1, dtype=torch.int32, device=DEVICE) + 1   # loaded now: a kernel's first launch waits for the device
    ticket = gate.next_ticket()
    out = gate.copy_when_open(ticket, host)
    after = out + 1                            # later work on the stream waits too
    done = torch.cuda.Event()
    done.record()
    time.sleep(0.05)
    assert not done.query() and not gate.was_late(ticket)   # held at the gate
    host.copy_(torch.arange(3000, dtype=torch.int32))   # written after the copy was queued
    gate.open(ticket)
    done.synchronize()
    assert torch.equal(out.cpu(), host) and torch.equal(after.cpu(), host + 1)
    assert not gate.was_late(ticket)
    # A later ticket opens every gate before it.
    first, second = gate.next_ticket(), gate.next_ticket()
    a, b = gate.copy_when_open(first, host), gate.copy_when_open(second, host)
    gate.open(second)
    torch.cuda.current_stream().synchronize()
    assert torch.equal(a.cpu(), host) and torch.equal(b.cpu(), host)


def test_a_gate_left_shut_gives_all_ones_after_its_timeout_and_says_so():
    """The safety net: nothing waits forever, not even a host thread whose first launch of a kernel waits for
    the device (CUDA's lazy loading) while the only one who could open the gate is that same thread."""
    gate = StreamGate.create(DEVICE, timeout_s=0.2)
    host = torch.arange(100, dtype=torch.int32).pin_memory()
    ticket = gate.next_ticket()
    t0 = time.perf_counter()
    out = gate.copy_when_open(ticket, host)
    torch.special.bessel_j1(torch.ones(7, device=DEVICE, dtype=torch.float64))   # a kernel never launched before
    torch.cuda.current_stream().synchronize()
    assert 0.005 < time.perf_counter() - t0 < 5   # it waited (polls take about a microsecond each)
    assert torch.equal(out.cpu(), torch.full((100,), -1, dtype=torch.int32)) and gate.was_late(ticket)
    ok = gate.next_ticket()
    gate.open(ok)
    assert torch.equal(gate.copy_when_open(ok, host).cpu(), host) and not gate.was_late(ok)


def test_the_counter_compares_cyclically_across_its_wrap(gate):
    host = torch.arange(10, dtype=torch.int32).pin_memory()
    gate._issued = 0xFFFFFFFE
    assert not gate.was_late(gate._issued)
    before = gate.next_ticket()
    after = gate.next_ticket()            # wraps (past 0, the late word's "none")
    assert (before, after) == (0xFFFFFFFF, 1)
    gate.open(before)
    assert torch.equal(gate.copy_when_open(before, host).cpu(), host)
    gate.open(after)
    assert torch.equal(gate.copy_when_open(after, host).cpu(), host)
    assert not gate.was_late(after)


def test_masks_written_after_the_sampling_was_queued_are_the_ones_it_uses(gate):
    """The sampler takes the masks through the gate: a buffer filled once the sampling is queued (as the mask
    thread does) gives the tokens of masks ready before."""
    vocab = 1000
    sampler = Sampler(vocab, DEVICE)
    logits = torch.randn(3, vocab, device=DEVICE)
    allowed = [[5, 17], [999], list(range(100, 200))]
    bits = np.zeros((3, (vocab + 31) // 32), dtype=np.uint32)
    for r, tokens in enumerate(allowed):
        for t in tokens:
            bits[r, t // 32] |= np.uint32(1 << (t % 32))
    ready = torch.from_numpy(bits.view(np.int32)).pin_memory()

    def rows():
        return [SampleRow(SamplingParams(temperature=t, logprobs=2), seed=3, step=0, prompt_ids=[1], output_ids=[],
                          mask_row=i) for i, t in enumerate((0.0, 0.7, 1.3))]

    assert sampler.fuses(rows())
    want = sampler.launch(logits, rows(), masks=ready).result()
    late = torch.zeros_like(ready).pin_memory()         # nothing allowed yet
    ticket = gate.next_ticket()
    pending = sampler.launch(logits, rows(), masks=late,
                             masks_upload=lambda host: gate.copy_when_open(ticket, host))
    time.sleep(0.02)
    late.copy_(ready)
    gate.open(ticket)
    got = pending.result()
    assert got.token_ids == want.token_ids and all(t in a for t, a in zip(got.token_ids, allowed))
    assert [lp.top for lp in got.logprobs] == [lp.top for lp in want.logprobs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_constrained_steps_behind_the_gate_give_the_tokens_of_masks_computed_first(llama32_dir, dtype):
    """Overlap on CUDA: sampling behind the gate and after the masks (mask_gate_rows=0) give the
    same tokens, greedy and seeded, constrained rows beside free ones, and every block comes back."""
    from test_structured_output import SCHEMAS

    def batch():
        return [GenerationRequest(prompt="The guard decides:", json_schema=SCHEMAS["nested"], max_new_tokens=60,
                                  temperature=t, seed=5) for t in (0.0, 0.9)] + \
               [GenerationRequest(prompt="Two words:", regex="[a-z]+ [a-z]+", max_new_tokens=20, temperature=0),
                GenerationRequest(prompt="Free", max_new_tokens=30, temperature=0.8, seed=1, ignore_eos=True)]

    results = {}
    for gated in (True, False):
        e = LLMEngine(llama32_dir, GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=512, dtype=dtype,
                                                   mask_gate_rows=1 if gated else 0), device="cuda")
        try:
            assert (e._mask_gate is not None) == gated
            results[gated] = [(r.tokens, r.finish_reason) for r in e.generate(batch())]
            assert e.num_steps_ahead > 20 and e.stats()["late_mask_gates"] == 0
            assert not gated or e._mask_gate.next_ticket() > 20   # most steps went through a gate
            assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
        finally:
            e.close()
    assert results[True] == results[False]
    assert all(reason in ("stop", "length") for _, reason in results[True])

"""StepInputs / StepStaging: a decode step's inputs packed for one host-to-device copy (CPU: the layout
and the staging are plain memory; `tests/test_gpu.py` runs them under CUDA graphs)."""

from __future__ import annotations

import torch

from gllm.runner.step_inputs import StepInputs, StepStaging

SIZES, WIDTH, SCRATCH, BS = [1, 2, 4, 8], 5, 99, 16


def device_view(host_bytes: torch.Tensor, size: int) -> dict[str, torch.Tensor]:
    """What the graph of `size` reads after the copy: its views over a buffer holding those bytes."""
    buffer = torch.zeros(StepInputs.nbytes_for(max(SIZES), WIDTH), dtype=torch.uint8)
    buffer[:host_bytes.numel()] = host_bytes
    return StepInputs(buffer, size, WIDTH).views


def test_views_are_typed_contiguous_aligned_and_disjoint():
    buffer = torch.zeros(StepInputs.nbytes_for(8, WIDTH), dtype=torch.uint8)
    for size in SIZES:
        inputs = StepInputs(buffer, size, WIDTH)
        spans = []
        for view in inputs.views.values():
            assert view.is_contiguous() and view.shape[0] == size
            start = view.storage_offset() * view.element_size()
            assert start % 8 == 0
            spans.append((start, start + view.numel() * view.element_size()))
        assert inputs.views["block_tables"].shape == (size, WIDTH) and inputs.views["context_lens"].dtype == torch.int32
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == inputs.nbytes
        assert inputs.nbytes == StepInputs.nbytes_for(size, WIDTH)


def test_stage_fills_rows_and_padding_in_the_sizes_layout():
    staging = StepStaging(SIZES, WIDTH, SCRATCH, BS, pin_memory=False)
    for size in SIZES:            # another size's layout overlaps these bytes: nothing of it may leak through
        staging.stage(size, [7] * min(size, 2), [[3]] * min(size, 2), token_ids=[5] * min(size, 2))
    tables = [[1, 2], [4, 6, 8]]
    got = device_view(staging.stage(4, [20, 33], tables, token_ids=[11, 12]), 4)
    assert got["input_ids"].tolist() == [11, 12, 0, 0]
    assert got["positions"].tolist() == [20, 33, 0, 0]
    assert got["context_lens"].tolist() == [21, 34, 1, 1]
    assert got["slot_mapping"].tolist() == [2 * BS + 4, 8 * BS + 1, SCRATCH * BS, SCRATCH * BS]
    assert got["block_tables"].tolist() == [[1, 2, SCRATCH, SCRATCH, SCRATCH], [4, 6, 8, SCRATCH, SCRATCH],
                                            [SCRATCH] * WIDTH, [SCRATCH] * WIDTH]
    assert got["gather_rows"].tolist() == [-1, -1, -1, -1]       # every input from input_ids
    ahead = device_view(staging.stage(2, [21], [[1, 2]], gather_rows=[1]), 2)
    assert ahead["gather_rows"].tolist() == [1, -1] and ahead["positions"].tolist() == [21, 0]
    assert ahead["input_ids"].tolist() == [0, 0]


def test_consecutive_steps_use_the_two_buffers_in_turn_and_padding_fills_both():
    staging = StepStaging(SIZES, WIDTH, SCRATCH, BS, pin_memory=False)
    first = staging.stage(1, [3], [[1]], token_ids=[9])
    second = staging.stage(1, [4], [[1]], token_ids=[10])
    assert first.data_ptr() != second.data_ptr()
    assert device_view(first, 1)["input_ids"].tolist() == [9]       # not overwritten by the next step
    padding = staging.padding(8)
    assert padding.numel() == StepInputs.nbytes_for(8, WIDTH)
    for buffer in staging.buffers:
        views = device_view(buffer[:padding.numel()], 8)
        assert views["context_lens"].tolist() == [1] * 8 and views["slot_mapping"].tolist() == [SCRATCH * BS] * 8

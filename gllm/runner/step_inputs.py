"""A step's inputs in one flat byte buffer, so that they cross to the GPU in a single copy.

Each copy costs the GPU a few microseconds whatever its size, and a decode step had five of them
(ids, positions, slots, context lengths, block tables), a prefill step seven. `PackedLayout` places named
typed arrays at aligned offsets of one byte buffer; the graphs read typed views of the device buffer, and
the host fills the same layout in pinned memory (`StepStaging` for decode steps, whose layout depends on
the batch size: `StepInputs`; `CudaGraphPrefill` for prefill steps), then copies the bytes once.
"""

from __future__ import annotations

import numpy as np
import torch

from gllm.kv import slot_of


class PackedLayout:
    """Named arrays (dtype, shape) back to back in a byte buffer, each starting on an `align`-byte boundary
    (Triton specialises a kernel on its pointers being 16-byte aligned: fields that kernels read vectorised
    want 16 or more)."""

    def __init__(self, fields: list[tuple[str, torch.dtype, tuple[int, ...]]], align: int = 8) -> None:
        self.fields: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        offset = end = 0
        for name, dtype, shape in fields:
            self.fields.append((name, dtype, shape, offset))
            end = offset + int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            offset = -(-end // align) * align
        self.nbytes = end

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of `buffer` (uint8, at least `nbytes`), on whatever device it lives."""
        out = {}
        for name, dtype, shape, offset in self.fields:
            size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            out[name] = buffer[offset:offset + size].view(dtype).view(shape)
        return out


class StepInputs:
    """Typed views of `buffer` (uint8) holding the inputs of a `batch`-row decode step."""

    FIELDS = (("input_ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
              ("gather_rows", torch.int64), ("context_lens", torch.int32))

    def __init__(self, buffer: torch.Tensor, batch: int, table_width: int) -> None:
        layout = self.layout(batch, table_width)
        self.nbytes = layout.nbytes
        self.views = layout.views(buffer)

    @classmethod
    def layout(cls, batch: int, table_width: int) -> PackedLayout:
        rows = [(name, dtype, (batch,)) for name, dtype in cls.FIELDS]
        return PackedLayout(rows + [("block_tables", torch.int32, (batch, table_width))])

    @staticmethod
    def nbytes_for(batch: int, table_width: int) -> int:
        return StepInputs.layout(batch, table_width).nbytes


class StepStaging:
    """The host side: two byte buffers (pinned for asynchronous copies) used in turn, because a step may be
    filled while the copy of the one before it is still queued. Filled through numpy views (a torch slice
    assignment costs ~7 µs of CPU, numpy's well under one)."""

    def __init__(self, sizes: list[int], table_width: int, scratch_block: int, block_size: int,
                 pin_memory: bool) -> None:
        nbytes = StepInputs.nbytes_for(max(sizes), table_width)
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(2)]
        if pin_memory:
            self.buffers = [b.pin_memory() for b in self.buffers]
        self.layouts = {b: StepInputs(self.buffers[0], b, table_width).nbytes for b in sizes}
        self._arrays = [{b: {name: view.numpy() for name, view in StepInputs(buf, b, table_width).views.items()}
                         for b in sizes} for buf in self.buffers]
        self.scratch_block, self.block_size = scratch_block, block_size   # (see `KVCache.scratch_block`)
        self._turn = 0

    def padding(self, size: int) -> torch.Tensor:
        """Every row of `size` as padding, in both buffers; returns the bytes to copy. The sizes' layouts
        overlap, so a graph's inputs are set this way just before it is captured."""
        for arrays in self._arrays:
            self._pad(arrays[size], 0, size)
        return self.buffers[0][:self.layouts[size]]

    def stage(self, size: int, positions: list[int], block_tables: list[list[int]],
              token_ids: list[int] | None = None, gather_rows: list[int] | None = None) -> torch.Tensor:
        """Fill the next buffer for one decode token per sequence (rows beyond len(positions) up to `size`
        are padding); returns the bytes to copy. Sequence i sits at positions[i] in blocks block_tables[i];
        its input is token_ids[i], or (run ahead) the device-side token of row gather_rows[i]; a row with
        gather_rows -1 takes its input_ids (see `triton_embedding.embed_tokens`)."""
        self._turn ^= 1
        arrays = self._arrays[self._turn][size]
        n = len(positions)
        bs = self.block_size
        pos, slots, ctx, table = (arrays[k] for k in ("positions", "slot_mapping", "context_lens", "block_tables"))
        pos[:n] = positions
        ctx[:n] = pos[:n] + 1
        for i, (blocks, p) in enumerate(zip(block_tables, positions)):
            table[i, :len(blocks)] = blocks
            table[i, len(blocks):] = self.scratch_block   # the bytes may hold another size's fields
            slots[i] = slot_of(blocks, p, bs)
        if token_ids is not None:
            arrays["input_ids"][:n] = token_ids
            arrays["gather_rows"][:n] = -1
        if gather_rows is not None:
            arrays["gather_rows"][:n] = gather_rows
            arrays["input_ids"][:n] = 0
        self._pad(arrays, n, size)
        return self.buffers[self._turn][:self.layouts[size]]

    def _pad(self, arrays: dict[str, np.ndarray], start: int, end: int) -> None:
        """Rows start..end as padding: harmless writes into the scratch block, which nothing reads."""
        arrays["input_ids"][start:end] = 0
        arrays["positions"][start:end] = 0
        arrays["slot_mapping"][start:end] = slot_of([self.scratch_block], 0, self.block_size)
        arrays["gather_rows"][start:end] = -1   # the input is input_ids, not a gathered token
        arrays["context_lens"][start:end] = 1
        arrays["block_tables"][start:end] = self.scratch_block

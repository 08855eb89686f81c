"""`CudaGraphDecoder`: decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
turns them into one. A step's inputs (ids, positions, slots, context lengths, block tables) live in
one static byte buffer that each step fills with a single non-blocking copy from pinned memory
(each copy costs the GPU a few microseconds, whatever its size); a batch is padded up to the next
captured size, the padding rows writing their K/V into a scratch block nobody reads. `run_ahead`
takes the input tokens from the previous step's sampled ids on the device, so a step can be queued
before those ids reach the host. The pinned buffer alternates between two: a step may be filled
while the copy of the one before it is still queued.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gllm.kv import KVCache
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops.triton_attention import DecodeAttentionWorkspace, decode_splits

DEFAULT_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class StepInputs:
    """Where a step of a given batch size finds its inputs: typed views into one flat byte buffer, laid out
    per size so that a step's inputs are the buffer's first `nbytes` bytes, moved in one copy."""

    FIELDS = (("input_ids", torch.int64), ("positions", torch.int64), ("slot_mapping", torch.int64),
              ("gather_rows", torch.int64), ("context_lens", torch.int32))

    def __init__(self, buffer: torch.Tensor, batch: int, table_width: int) -> None:
        views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, dtype in self.FIELDS:
            views[name] = buffer[offset:offset + 8 * batch].view(dtype)[:batch]
            offset += 8 * batch                       # int32 fields padded to 8 bytes a row: aligned views
        table_bytes = 4 * batch * table_width
        views["block_tables"] = buffer[offset:offset + table_bytes].view(torch.int32).view(batch, table_width)
        self.nbytes = offset + table_bytes
        self.views = views

    @staticmethod
    def nbytes_for(batch: int, table_width: int) -> int:
        return 8 * batch * len(StepInputs.FIELDS) + 4 * batch * table_width


class CudaGraphDecoder:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 scratch_block: int, device: torch.device, ladder: tuple[int, ...] = DEFAULT_LADDER) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.block_size = kv_cache.block_size
        self.scratch_block = scratch_block
        sizes = sorted({b for b in ladder if b < max_batch} | {max_batch})
        self.batch_sizes = sizes
        cfg = model.cfg
        top = sizes[-1]
        # Every step's inputs travel in one asynchronous copy from pinned memory; the host side has two
        # buffers used in turn, because a step may be filled while the copy of the one before is queued.
        nbytes = StepInputs.nbytes_for(top, max_blocks_per_seq)
        self._device_buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_buffers = [torch.zeros(nbytes, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self.inputs = {b: StepInputs(self._device_buffer, b, max_blocks_per_seq) for b in sizes}
        self._host_inputs = [{b: StepInputs(buf, b, max_blocks_per_seq) for b in sizes} for buf in self._host_buffers]
        self._turn = 0
        self.rows = torch.arange(top, dtype=torch.int64, device=device)
        self.workspaces = {b: DecodeAttentionWorkspace(b, cfg.num_attention_heads, cfg.head_dim,
                                                       decode_splits(b, cfg.num_key_value_heads, device), device,
                                                       dependent_launch=model.dependent_launch)
                           for b in sizes}
        self._capture_all()

    def _batch(self, b: int) -> ForwardBatch:
        """Size b's batch over its views, its inputs set to padding (capture and its warm-up run read them;
        the sizes' layouts overlap in the buffer, so this is done for each size just before its capture)."""
        for host in self._host_inputs:
            self._pad(host[b].views, 0, b)
        nbytes = self.inputs[b].nbytes
        self._device_buffer[:nbytes].copy_(self._host_buffers[0][:nbytes])
        v = self.inputs[b].views
        return ForwardBatch(
            input_ids=v["input_ids"], positions=v["positions"], slot_mapping=v["slot_mapping"],
            context_lens=v["context_lens"], block_tables=v["block_tables"],
            logits_indices=self.rows[:b], query_lens_host=[1] * b, context_lens_host=[1] * b,
            decode_kernel=self.workspaces[b])

    def _capture_all(self) -> None:
        # The prefill graphs share the pool: steps never run concurrently.
        self.graphs, self.outputs, self.pool = capture_graphs(self.model, self.kv_cache, self.batch_sizes, self._batch,
                                                              self.device)

    def _pad(self, views: dict[str, torch.Tensor], start: int, end: int) -> None:
        """Rows start..end as padding: harmless writes into the scratch block."""
        views["input_ids"][start:end] = 0
        views["positions"][start:end] = 0
        views["slot_mapping"][start:end] = self.scratch_block * self.block_size
        views["gather_rows"][start:end] = 0
        views["context_lens"][start:end] = 1
        views["block_tables"][start:end] = self.scratch_block

    def padded_size(self, batch: int) -> int | None:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        return None

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode token per sequence; returns float32 logits [len(token_ids), vocab]."""
        host, b = self._stage(positions, block_tables)
        host["input_ids"].numpy()[:len(token_ids)] = token_ids
        self._copy_inputs(b)
        return self._replay(len(token_ids), b)

    def run_ahead(self, previous_tokens: torch.Tensor, rows: list[int], positions: list[int],
                  block_tables: list[list[int]]) -> torch.Tensor:
        """Like `run`, with the input token of sequence i being `previous_tokens[rows[i]]` (on the device)."""
        host, b = self._stage(positions, block_tables)
        n = len(rows)
        host["gather_rows"].numpy()[:n] = rows
        self._copy_inputs(b)
        dev = self.inputs[b].views
        torch.index_select(previous_tokens, 0, dev["gather_rows"][:n], out=dev["input_ids"][:n])
        return self._replay(n, b)

    def _stage(self, positions: list[int], block_tables: list[list[int]]) -> tuple[dict[str, torch.Tensor], int]:
        n = len(positions)
        b = self.padded_size(n)
        assert b is not None, f"batch {n} exceeds the largest captured graph"
        self._turn ^= 1
        host = self._host_inputs[self._turn][b].views
        bs = self.block_size
        pos, slots, ctx, table = (host[k].numpy() for k in ("positions", "slot_mapping", "context_lens",
                                                           "block_tables"))
        pos[:n] = positions
        ctx[:n] = pos[:n] + 1
        for i, (blocks, p) in enumerate(zip(block_tables, positions)):
            table[i, :len(blocks)] = blocks
            table[i, len(blocks):] = self.scratch_block   # the bytes may hold another size's fields
            slots[i] = blocks[p // bs] * bs + p % bs
        self._pad(host, n, b)
        return host, b

    def _copy_inputs(self, b: int) -> None:
        nbytes = self.inputs[b].nbytes
        self._device_buffer[:nbytes].copy_(self._host_buffers[self._turn][:nbytes], non_blocking=True)

    def _replay(self, n: int, b: int) -> torch.Tensor:
        self.graphs[b].replay()
        return self.outputs[b][:n]


def capture_graphs(model: LlamaForCausalLM, kv_cache: KVCache, sizes: list[int],
                   make_batch: Callable[[int], ForwardBatch], device: torch.device, pool: tuple | None = None
                   ) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor], tuple]:
    """Capture one model step per size (the batch from `make_batch(size)`, reading static buffers) into
    graphs sharing one memory pool; returns the graphs, their output logits, and the pool."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    for size in sorted(sizes, reverse=True):   # largest first, so smaller graphs reuse its memory
        batch = make_batch(size)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            model(batch, kv_cache.layers)     # warm-up: compile kernels, pick algorithms
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            outputs[size] = model(batch, kv_cache.layers)
        pool = graph.pool()
        graphs[size] = graph
        # A graph's first launch uploads it: do that now, not in a step (while this size's inputs are the
        # padding `make_batch` set up: writes go to the scratch block).
        graph.replay()
    torch.cuda.synchronize(device)
    return graphs, outputs, pool

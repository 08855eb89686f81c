"""`CudaGraphDecoder`: decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
turns them into one. Inputs live in static buffers that each step fills with one non-blocking
copy from pinned memory; a batch is padded up to the next captured size, the padding rows
writing their K/V into a scratch block nobody reads. `run_ahead` takes the input tokens from the
previous step's sampled ids on the device, so a step can be queued before those ids reach the host.
The pinned staging buffers alternate between two sets: a step may be filled while the copies of the
one before it are still queued.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gllm.kv import KVCache
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops.triton_attention import DecodeAttentionWorkspace, decode_splits

DEFAULT_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


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
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(top, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(top, dtype=torch.int32, device=device)
        self.rows = torch.arange(top, dtype=torch.int64, device=device)
        self.gather_rows = torch.zeros(top, dtype=torch.int64, device=device)   # run_ahead: previous row of each
        # Host staging in pinned memory: one asynchronous copy per buffer per step, two sets used in turn.
        self._staging = [{name: torch.zeros_like(getattr(self, name), device="cpu").pin_memory()
                          for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
                                       "gather_rows")} for _ in range(2)]
        self._turn = 0
        self.workspaces = {b: DecodeAttentionWorkspace(b, cfg.num_attention_heads, cfg.head_dim,
                                                       decode_splits(b, cfg.num_key_value_heads, device), device,
                                                       dependent_launch=model.dependent_launch)
                           for b in sizes}
        self._capture_all()

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
            context_lens=self.context_lens[:b], block_tables=self.block_tables[:b],
            logits_indices=self.rows[:b], query_lens_host=[1] * b, context_lens_host=[1] * b,
            decode_kernel=self.workspaces[b])

    def _capture_all(self) -> None:
        self._fill_padding(0)
        # The prefill graphs share the pool: steps never run concurrently.
        self.graphs, self.outputs, self.pool = capture_graphs(self.model, self.kv_cache, self.batch_sizes, self._batch,
                                                              self.device)

    def _fill_padding(self, start: int) -> None:
        scratch_slot = self.scratch_block * self.block_size
        for host in self._staging:
            host["input_ids"][start:] = 0
            host["positions"][start:] = 0
            host["slot_mapping"][start:] = scratch_slot
            host["block_tables"][start:] = self.scratch_block
            host["context_lens"][start:] = 1
            host["gather_rows"][start:] = 0
        for name, buf in self._staging[0].items():
            getattr(self, name).copy_(buf, non_blocking=True)
        torch.cuda.synchronize(self.device)

    def padded_size(self, batch: int) -> int | None:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        return None

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode token per sequence; returns float32 logits [len(token_ids), vocab]."""
        host, b = self._stage(positions, block_tables)
        n = len(token_ids)
        ids = host["input_ids"].numpy()
        ids[:n] = token_ids
        ids[n:b] = 0
        self.input_ids[:b].copy_(host["input_ids"][:b], non_blocking=True)
        return self._replay(host, n, b)

    def run_ahead(self, previous_tokens: torch.Tensor, rows: list[int], positions: list[int],
                  block_tables: list[list[int]]) -> torch.Tensor:
        """Like `run`, with the input token of sequence i being `previous_tokens[rows[i]]` (on the device)."""
        host, b = self._stage(positions, block_tables)
        n = len(rows)
        host["gather_rows"].numpy()[:n] = rows
        self.gather_rows[:n].copy_(host["gather_rows"][:n], non_blocking=True)
        torch.index_select(previous_tokens, 0, self.gather_rows[:n], out=self.input_ids[:n])
        return self._replay(host, n, b)

    def _stage(self, positions: list[int], block_tables: list[list[int]]) -> tuple[dict[str, torch.Tensor], int]:
        n = len(positions)
        b = self.padded_size(n)
        assert b is not None, f"batch {n} exceeds the largest captured graph"
        host = self._staging[self._turn]
        self._turn ^= 1
        bs = self.block_size
        pos, slots, ctx, table = (host[k].numpy() for k in ("positions", "slot_mapping", "context_lens",
                                                           "block_tables"))
        pos[:n] = positions
        ctx[:n] = pos[:n] + 1
        for i, (blocks, p) in enumerate(zip(block_tables, positions)):
            table[i, :len(blocks)] = blocks
            slots[i] = blocks[p // bs] * bs + p % bs
        # Padding rows of this size class: harmless writes into the scratch block.
        pos[n:b], slots[n:b], ctx[n:b] = 0, self.scratch_block * bs, 1
        table[n:b] = self.scratch_block
        return host, b

    def _replay(self, host: dict[str, torch.Tensor], n: int, b: int) -> torch.Tensor:
        for name in ("positions", "slot_mapping", "context_lens", "block_tables"):
            getattr(self, name)[:b].copy_(host[name][:b], non_blocking=True)
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
    for graph in graphs.values():   # a graph's first launch uploads it: do that now, not in a step
        graph.replay()              # (inputs are all padding: writes go to the scratch block)
    torch.cuda.synchronize(device)
    return graphs, outputs, pool

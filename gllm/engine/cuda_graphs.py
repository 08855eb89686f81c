"""`CudaGraphDecoder`: decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
turns them into one. Inputs live in static buffers that each step fills with one non-blocking
copy from pinned memory; a batch is padded up to the next captured size, the padding rows
writing their K/V into a scratch block nobody reads.
"""

from __future__ import annotations

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
        # Host staging in pinned memory: one asynchronous copy per buffer per step.
        self._host = {name: torch.zeros_like(getattr(self, name), device="cpu").pin_memory()
                      for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens")}
        self.workspaces = {b: DecodeAttentionWorkspace(b, cfg.num_attention_heads, cfg.head_dim,
                                                       decode_splits(b, cfg.num_key_value_heads, device), device)
                           for b in sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
            context_lens=self.context_lens[:b], block_tables=self.block_tables[:b],
            logits_indices=self.rows[:b], query_lens_host=[1] * b, context_lens_host=[1] * b,
            decode_kernel=self.workspaces[b])

    def _capture_all(self) -> None:
        self._fill_padding(0)
        pool = None
        stream = torch.cuda.Stream(self.device)
        for b in reversed(self.batch_sizes):   # largest first, so smaller graphs reuse its pool
            batch = self._batch(b)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.model(batch, self.kv_cache.layers)     # warm-up: compile kernels, pick algorithms
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[b] = self.model(batch, self.kv_cache.layers)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)

    def _fill_padding(self, start: int) -> None:
        scratch_slot = self.scratch_block * self.block_size
        host = self._host
        host["input_ids"][start:] = 0
        host["positions"][start:] = 0
        host["slot_mapping"][start:] = scratch_slot
        host["block_tables"][start:] = self.scratch_block
        host["context_lens"][start:] = 1
        for name, buf in host.items():
            getattr(self, name).copy_(buf, non_blocking=True)

    def padded_size(self, batch: int) -> int | None:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        return None

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One decode token per sequence; returns float32 logits [len(token_ids), vocab]."""
        n = len(token_ids)
        b = self.padded_size(n)
        assert b is not None, f"batch {n} exceeds the largest captured graph"
        bs = self.block_size
        ids, pos, slots, ctx, table = (self._host[k].numpy() for k in
                                       ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables"))
        ids[:n] = token_ids
        pos[:n] = positions
        ctx[:n] = pos[:n] + 1
        for i, (blocks, p) in enumerate(zip(block_tables, positions)):
            table[i, :len(blocks)] = blocks
            slots[i] = blocks[p // bs] * bs + p % bs
        # Padding rows of this size class: harmless writes into the scratch block.
        ids[n:b], pos[n:b], slots[n:b], ctx[n:b] = 0, 0, self.scratch_block * bs, 1
        table[n:b] = self.scratch_block
        for name in ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables"):
            getattr(self, name)[:b].copy_(self._host[name][:b], non_blocking=True)
        self.graphs[b].replay()
        return self.outputs[b][:n]

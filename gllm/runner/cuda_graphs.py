"""`CudaGraphDecoder`: decode steps replayed from CUDA graphs captured for a ladder of batch sizes.

A decode step of a small model is hundreds of tiny kernel launches; replaying a captured graph
turns them into one. A step's inputs (ids, positions, slots, context lengths, block tables) live in
one static byte buffer (`StepInputs`) that each step fills with a single non-blocking copy from
pinned memory (`StepStaging`); a batch is padded up to the next captured size, the padding rows
writing their K/V into a scratch block nobody reads. `run_ahead` takes the input tokens from the
previous step's sampled ids on the device (gathered by the graph's embedding kernel), so a step can
be queued before those ids reach the host.

Up to `GREEDY_IN_GRAPH` rows, a graph also ends with the greedy argmax of its logits, written into a
static token buffer that the next step's graph gathers its inputs from: in steady greedy decoding a
step is one copy in, one graph, one copy out. (Above that size the argmax's read of the logits would
cost more than the launches it saves whenever the batch samples.)
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from gllm.kv import KVCache
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops import DecodeKernelPlan
from gllm.ops.triton_attention import DecodeAttentionWorkspace, decode_splits
from gllm.runner.step_inputs import StepInputs, StepStaging
from gllm.runner.step_output import StepOutput
from gllm.sampling.triton_argmax import argmax

GREEDY_IN_GRAPH = 32
DEFAULT_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class CudaGraphDecoder:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device, ladder: tuple[int, ...] = DEFAULT_LADDER) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.block_size = kv_cache.block_size
        sizes = sorted({b for b in ladder if b < max_batch} | {max_batch})
        self.batch_sizes = sizes
        cfg = model.cfg
        top = sizes[-1]
        # Every step's inputs travel in one asynchronous copy from pinned memory.
        self._device_buffer = torch.zeros(StepInputs.nbytes_for(top, max_blocks_per_seq), dtype=torch.uint8,
                                          device=device)
        self.inputs = {b: StepInputs(self._device_buffer, b, max_blocks_per_seq) for b in sizes}
        self.staging = StepStaging(sizes, max_blocks_per_seq, kv_cache.scratch_block, self.block_size,
                                   pin_memory=True)
        self.rows = torch.arange(top, dtype=torch.int64, device=device)
        # The tokens a run-ahead step gathers its inputs from; graphs of up to GREEDY_IN_GRAPH rows write
        # their greedy argmax here.
        self.tokens = torch.zeros(top, dtype=torch.int64, device=device)
        self.workspaces = {b: DecodeAttentionWorkspace(b, cfg.num_attention_heads, cfg.head_dim,
                                                       decode_splits(b, cfg.num_key_value_heads, device), device,
                                                       dependent_launch=model.kernels.dependent_launch)
                           for b in sizes}
        self._capture_all()

    def _batch(self, b: int) -> ForwardBatch:
        """Size b's batch over its views, its inputs set to padding (capture and its warm-up run read them;
        the sizes' layouts overlap in the buffer, so this is done for each size just before its capture)."""
        padding = self.staging.padding(b)
        self._device_buffer[:padding.numel()].copy_(padding)
        v = self.inputs[b].views
        return ForwardBatch(
            input_ids=v["input_ids"], positions=v["positions"], slot_mapping=v["slot_mapping"],
            context_lens=v["context_lens"], block_tables=v["block_tables"],
            logits_indices=self.rows[:b], attention=DecodeKernelPlan(self.workspaces[b]),
            token_source=(v["gather_rows"], self.tokens))

    def _step(self, b: int) -> Callable[[], torch.Tensor]:
        """What size b's graph runs: the model (its inputs partly gathered from `tokens`) and, for small sizes,
        the greedy argmax."""
        batch = self._batch(b)

        def step() -> torch.Tensor:
            logits = self.model(batch, self.kv_cache.layers)
            if b <= GREEDY_IN_GRAPH:
                argmax(logits, out=self.tokens[:b], dependent_launch=self.model.kernels.dependent_launch)
            return logits
        return step

    def _capture_all(self) -> None:
        # The prefill graphs share the pool: steps never run concurrently.
        self.graphs, self.outputs, self.pool = capture_graphs(self.batch_sizes, self._step, self.device)

    def padded_size(self, batch: int) -> int | None:
        for b in self.batch_sizes:
            if b >= batch:
                return b
        return None

    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> StepOutput:
        """One decode token per sequence."""
        b = self._padded(len(token_ids))
        self._copy_inputs(self.staging.stage(b, positions, block_tables, token_ids=token_ids))
        return self._replay(len(token_ids), b)

    def run_ahead(self, previous_tokens: torch.Tensor, rows: list[int], positions: list[int],
                  block_tables: list[list[int]]) -> StepOutput:
        """Like `run`, with the input token of sequence i being `previous_tokens[rows[i]]` (on the device)."""
        n = len(rows)
        b = self._padded(n)
        if not self.owns_tokens(previous_tokens):   # sampled outside a graph: bring them where graphs read
            self.tokens[:previous_tokens.shape[0]].copy_(previous_tokens)
        self._copy_inputs(self.staging.stage(b, positions, block_tables, gather_rows=rows))
        return self._replay(n, b)

    def owns_tokens(self, tokens: torch.Tensor) -> bool:
        """Whether `tokens` is this decoder's token buffer from its start (what a graph's argmax returned)."""
        return tokens.data_ptr() == self.tokens.data_ptr() and tokens.dim() == 1

    def _padded(self, n: int) -> int:
        b = self.padded_size(n)
        assert b is not None, f"batch {n} exceeds the largest captured graph"
        return b

    def _copy_inputs(self, host_bytes: torch.Tensor) -> None:
        self._device_buffer[:host_bytes.numel()].copy_(host_bytes, non_blocking=True)

    def _replay(self, n: int, b: int) -> StepOutput:
        self.graphs[b].replay()
        return StepOutput(self.outputs[b][:n], self.tokens[:n] if b <= GREEDY_IN_GRAPH else None)


def capture_graphs(sizes: list[int], make_step: Callable[[int], Callable[[], torch.Tensor]], device: torch.device,
                   pool: tuple | None = None) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor], tuple]:
    """Capture one step per size (`make_step(size)()`, reading static buffers, returning the logits) into
    graphs sharing one memory pool; returns the graphs, their output logits, and the pool."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    stream = torch.cuda.Stream(device)
    for size in sorted(sizes, reverse=True):   # largest first, so smaller graphs reuse its memory
        step = make_step(size)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            step()                            # warm-up: compile kernels, pick algorithms
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (another engine, a restore, the game's own) do not
        # invalidate this capture. This thread's own can: a garbage collection inside the capture that frees
        # an earlier engine's graphs destroys them mid-capture ("operation not permitted when stream is
        # capturing"), so the collector waits until the capture ends (torch.cuda.graph collects on entry).
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                outputs[size] = step()
        finally:
            if collecting:
                gc.enable()
        pool = graph.pool()
        graphs[size] = graph
        # A graph's first launch uploads it: do that now, not in a step (while this size's inputs are the
        # padding `make_step` set up: writes go to the scratch block).
        graph.replay()
    torch.cuda.synchronize(device)
    return graphs, outputs, pool

"""`ModelRunner`: turns the scheduler's choice into one model step and its logits on the device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gllm.kv import KVCache, slots_of
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops import AttentionPlan, MixedKernelPlan, SdpaPlan
from gllm.runner.fast_path import FastPath, RunnerConfig
from gllm.runner.step_output import StepOutput
from gllm.scheduler import SchedulerOutput
from gllm.transfer import to_device


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device, fast_path: FastPath,
                 config: RunnerConfig) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.fast_path = fast_path
        self.cpu_threads = config.cpu_threads
        self._threads = 0                 # what this runner last set on its (the engine's) thread; 0: not yet
        self.block_size = kv_cache.block_size
        model.use_kernels(fast_path.kernels)
        self.graph_decoder = self.prefill_graphs = None
        if fast_path.decode_graphs:
            from gllm.runner.cuda_graphs import CudaGraphDecoder
            from gllm.runner.prefill_graphs import CudaGraphPrefill
            self.graph_decoder = CudaGraphDecoder(model, kv_cache, config.max_batch_size, config.max_blocks_per_seq,
                                                  device)
            if fast_path.prefill_graph_tokens:
                self.prefill_graphs = CudaGraphPrefill(model, kv_cache, fast_path.prefill_graph_tokens,
                                                       config.max_batch_size, config.max_blocks_per_seq, device,
                                                       pool=self.graph_decoder.pool)

    def build_batch(self, out: SchedulerOutput, ahead_positions: list[int] | None = None) -> ForwardBatch:
        """The flat batch of `out`; with `ahead_positions`, one decode per sequence at those positions and
        input ids left as placeholders (the caller puts the device-side tokens in)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        for s in out.scheduled:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            if ahead_positions is None:
                input_ids += seq.token_ids[start:start + n]
            else:
                start = ahead_positions[len(query_lens)]
                input_ids.append(0)
            positions += range(start, start + n)
            slots += slots_of(seq.block_table.block_ids, start, start + n, bs)
            query_lens.append(n)
            context_lens.append(start + n)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
        width = max(len(s.seq.block_table.block_ids) for s in out.scheduled)
        tables = [s.seq.block_table.block_ids + [0] * (width - len(s.seq.block_table.block_ids))
                  for s in out.scheduled]

        def tensor(values: list) -> torch.Tensor:
            return to_device(values, torch.int64, self.device)

        block_tables, context_lens_device = tensor(tables), tensor(context_lens)
        return ForwardBatch(
            input_ids=tensor(input_ids), positions=tensor(positions), slot_mapping=tensor(slots),
            context_lens=context_lens_device, block_tables=block_tables, logits_indices=tensor(logits_indices),
            attention=self._attention_plan(query_lens, context_lens, block_tables, context_lens_device))

    def _attention_plan(self, query_lens: list[int], context_lens: list[int], block_tables: torch.Tensor,
                        context_lens_device: torch.Tensor) -> AttentionPlan:
        """An eager step's kernels: the Triton ones on the fast path, else plain SDPA."""
        if not self.fast_path.triton:
            return SdpaPlan(query_lens, context_lens, float32=self.fast_path.float32_attention)
        cfg = self.model.cfg
        return MixedKernelPlan.build(query_lens, context_lens, block_tables, context_lens_device,
                                     cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def uses_graph(self, out: SchedulerOutput) -> bool:
        """Whether `run(out)` replays a CUDA graph (every sequence decodes one token, in a captured size)."""
        decoder = self.graph_decoder
        return (decoder is not None and decoder.padded_size(len(out.scheduled)) is not None
                and all(s.num_tokens == 1 and s.samples for s in out.scheduled))

    def run(self, out: SchedulerOutput, between_layers: Callable[[bool], None] | None = None) -> StepOutput:
        """Compute the scheduled tokens; float32 logits for each sequence that samples, in schedule order.
        `between_layers`: called between the decoder layers of an eager step (see `ForwardBatch`)."""
        if self.fast_path.one_thread_tokens:
            self._use_threads(1 if out.num_tokens <= self.fast_path.one_thread_tokens else self.cpu_threads)
        if self.uses_graph(out):
            seqs = [s.seq for s in out.scheduled]
            return self.graph_decoder.run([q.token_ids[-1] for q in seqs], [len(q.token_ids) - 1 for q in seqs],
                                          [q.block_table.block_ids for q in seqs])
        graphs = self.prefill_graphs
        if (graphs is not None and len(out.scheduled) <= graphs.max_seqs
                and all(s.num_tokens > 1 for s in out.scheduled)):
            from gllm.runner.prefill_graphs import PrefillChunk
            chunks = [PrefillChunk(s.seq.token_ids[s.seq.num_computed_tokens:s.seq.num_computed_tokens + s.num_tokens],
                                   s.seq.num_computed_tokens, s.seq.block_table.block_ids, s.samples)
                      for s in out.scheduled]
            if graphs.padded_size(chunks) is not None:
                return StepOutput(graphs.run(chunks))
        batch = self.build_batch(out)
        batch.between_layers = between_layers
        return StepOutput(self.model(batch, self.kv_cache.layers))

    def _use_threads(self, threads: int) -> None:
        """torch's compute threads for this step (per calling thread under OpenMP; changed only when it differs)."""
        if threads != self._threads:
            torch.set_num_threads(threads)
            self._threads = threads

    def hidden_states(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        """One sequence's final hidden states [T, hidden], its whole KV written into `block_ids` (embeddings:
        always eager and one sequence at a time, so a text's vector never depends on what else is computed)."""
        n = len(token_ids)

        def tensor(values: list) -> torch.Tensor:
            return to_device(values, torch.int64, self.device)

        block_tables, context_lens = tensor([block_ids]), tensor([n])
        batch = ForwardBatch(input_ids=tensor(token_ids), positions=tensor(list(range(n))),
                             slot_mapping=tensor(slots_of(block_ids, 0, n, self.block_size)),
                             context_lens=context_lens, block_tables=block_tables, logits_indices=tensor([n - 1]),
                             attention=self._attention_plan([n], [n], block_tables, context_lens))
        return self.model.hidden_states(batch, self.kv_cache.layers)

    def run_ahead(self, out: SchedulerOutput, previous_tokens: torch.Tensor, rows: list[int]) -> StepOutput:
        """A decode step queued before its input tokens reach the host: sequence i's input is
        `previous_tokens[rows[i]]` and its position `num_computed_tokens` (see `Scheduler.schedule_ahead`)."""
        seqs = [s.seq for s in out.scheduled]
        positions = [q.num_computed_tokens for q in seqs]
        if self.uses_graph(out):
            return self.graph_decoder.run_ahead(previous_tokens, rows, positions,
                                                [q.block_table.block_ids for q in seqs])
        batch = self.build_batch(out, positions)
        batch.input_ids = previous_tokens[to_device(rows, torch.int64, self.device)]
        return StepOutput(self.model(batch, self.kv_cache.layers))

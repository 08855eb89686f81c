"""`ModelRunner`: turns the scheduler's choice into one model step and the sampled tokens."""

from __future__ import annotations

import torch

from gllm.kv import KVCache
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size

    def build_batch(self, out: SchedulerOutput) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        for s in out.scheduled:
            seq, start, n = s.seq, s.seq.num_computed_tokens, s.num_tokens
            blocks = seq.block_table.block_ids
            input_ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
            query_lens.append(n)
            context_lens.append(start + n)
            if s.samples:
                logits_indices.append(len(input_ids) - 1)
        width = max(len(s.seq.block_table.block_ids) for s in out.scheduled)
        tables = [s.seq.block_table.block_ids + [0] * (width - len(s.seq.block_table.block_ids))
                  for s in out.scheduled]

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        return ForwardBatch(
            input_ids=tensor(input_ids), positions=tensor(positions), slot_mapping=tensor(slots),
            query_lens=tensor(query_lens), context_lens=tensor(context_lens), block_tables=tensor(tables),
            logits_indices=tensor(logits_indices), query_lens_host=query_lens, context_lens_host=context_lens)

    def run(self, out: SchedulerOutput) -> torch.Tensor:
        """Compute the scheduled tokens; float32 logits for each sequence that samples, in schedule order."""
        return self.model(self.build_batch(out), self.kv_cache.layers)

"""`ForwardBatch`: what one model step reads — a flat token batch plus the paged-KV addressing.

The model never sees requests: the engine flattens every scheduled sequence (prefill chunks and
single decode tokens alike) into these tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # [T] int64, the tokens of all sequences, back to back
    positions: torch.Tensor      # [T] int64, each token's absolute position in its sequence
    slot_mapping: torch.Tensor   # [T] int64, KV slot (block * block_size + offset) each token writes
    context_lens: torch.Tensor   # [B] int32/int64, KV length of each sequence after this step
    block_tables: torch.Tensor   # [B, max_blocks] int32/int64, physical blocks of each sequence (padded with 0)
    logits_indices: torch.Tensor  # [N] int64, rows of the flat batch whose next-token logits are wanted
    query_lens_host: list[int]   # the same lengths on the host, so attention can group without a sync
    context_lens_host: list[int]
    use_triton: bool = False     # GPU eager steps: Triton prefill/decode kernels instead of SDPA
    # Set for decode-only batches on the GPU fast path (one token per sequence; shapes fixed by the batch
    # size, so the step can be captured in a CUDA graph): the Triton decode kernel's workspace.
    decode_kernel: Any = None
    # Set for decode graphs: (gather_rows [T], source [>= T]): a row with gather_rows >= 0 takes its input
    # token from source (the previous step's sampled ids on the device) instead of input_ids.
    token_source: tuple[torch.Tensor, torch.Tensor] | None = None
    # Set for prefill-only batches replayed from a CUDA graph: their Triton prefill plan, in static buffers.
    prefill_plan: Any = None
    # Per-step attention metadata that every layer shares: built by the first layer, reused by the rest.
    attention_plan: Any = None

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of `hidden` that logits are wanted for. The indices increase, so as many of them as there
        are tokens means every row (a decode step): no gather kernel then."""
        if self.logits_indices.shape[0] == hidden.shape[0]:
            return hidden
        return hidden[self.logits_indices]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

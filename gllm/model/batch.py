"""`ForwardBatch`: what one model step reads — a flat token batch plus the paged-KV addressing.

The model never sees requests: the model runner flattens every scheduled sequence (prefill chunks and
single decode tokens alike) into these tensors, and chooses the step's attention kernels in `attention`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gllm.ops import AttentionPlan


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # [T] int64, the tokens of all sequences, back to back
    positions: torch.Tensor      # [T] int64, each token's absolute position in its sequence
    slot_mapping: torch.Tensor   # [T] int64, KV slot (block * block_size + offset) each token writes
    context_lens: torch.Tensor   # [B] int32/int64, KV length of each sequence after this step
    block_tables: torch.Tensor   # [B, max_blocks] int32/int64, physical blocks of each sequence (padded)
    logits_indices: torch.Tensor  # [N] int64, rows of the flat batch whose next-token logits are wanted
    attention: AttentionPlan     # which attention kernels every layer of this step uses
    # Set for decode graphs: (gather_rows [T], source [>= T]): a row with gather_rows >= 0 takes its input
    # token from source (the previous step's sampled ids on the device) instead of input_ids.
    token_source: tuple[torch.Tensor, torch.Tensor] | None = None
    # Called after each decoder layer, before the next or the head (its argument: the head comes next; eager CPU
    # steps only, where the layers run as this thread computes them): the engine may pause there for a game's
    # next idle window.
    between_layers: Callable[[bool], None] | None = None

    def logits_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of `hidden` that logits are wanted for. The indices increase, so as many of them as there
        are tokens means every row (a decode step): no gather kernel then."""
        if self.logits_indices.shape[0] == hidden.shape[0]:
            return hidden
        return hidden[self.logits_indices]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

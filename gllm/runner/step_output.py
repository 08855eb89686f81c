"""`StepOutput`: what one model step hands the sampler."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    logits: torch.Tensor                       # [N, vocab] float32, one row per sequence that samples
    greedy_tokens: torch.Tensor | None = None  # [N] int64: each row's argmax, where a decode graph computed it

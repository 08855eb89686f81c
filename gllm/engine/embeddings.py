"""Embeddings from the loaded model: pooled final hidden states (mean over the tokens by default, or the last
token's), L2-normalised. A text runs on the engine thread between generation steps, alone in its forward pass
and in blocks of the same KV pool (given back at once), so its vector never depends on what else is in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gllm.engine.errors import EngineBusy, RequestRejected
from gllm.kv import BlockManager, BlockTable
from gllm.runner import ModelRunner

POOLINGS = ("mean", "last")
MAX_INPUTS = 2048


@dataclass
class Embeddings:
    vectors: list[list[float]]    # one per input, in input order, each of unit length
    prompt_tokens: int            # tokens read, all inputs together


def check_inputs(inputs: object) -> list[str | list[int]]:
    """The inputs as a list of texts or token id lists (OpenAI's `input`: a string, a list of strings, a list of
    token ids, or a list of such lists)."""
    if isinstance(inputs, str):
        return [inputs]
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise RequestRejected("input must be a string, a non-empty list of strings or of token id lists", "input")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
        return [list(inputs)]
    if len(inputs) > MAX_INPUTS:
        raise RequestRejected(f"input takes at most {MAX_INPUTS} items, got {len(inputs)}", "input")
    out: list[str | list[int]] = []
    for item in inputs:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (list, tuple)) and item and all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in item):
            out.append(list(item))
        else:
            raise RequestRejected("each input must be a string or a non-empty list of token ids", "input")
    return out


def embed_tokens(runner: ModelRunner, blocks: BlockManager, token_ids: list[int], pooling: str) -> list[float]:
    """One input's vector (engine thread)."""
    table = BlockTable()
    if not blocks.grow(table, len(token_ids)):
        raise EngineBusy(f"no free KV blocks for an input of {len(token_ids)} tokens now; retry later")
    try:
        hidden = runner.hidden_states(token_ids, table.block_ids).float()
    finally:
        blocks.free(table)
    pooled = hidden.mean(dim=0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(pooled, dim=0).cpu().tolist()

"""Test helpers shared by several test modules: the transformers reference and a direct model stepper."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from gllm.kv import BlockManager, BlockTable, KVCache, slots_of
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops import SdpaPlan


@lru_cache(maxsize=4)
def hf_model(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def hf_greedy(folder: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = hf_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(prompt_ids):].tolist()


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(folder)(torch.tensor([ids])).logits[0].float()


class Stepper:
    """Drives one sequence through a gllm model with a real paged cache, chunk by chunk (on the model's device)."""

    def __init__(self, model: LlamaForCausalLM, block_size: int, num_blocks: int = 64) -> None:
        cfg = model.cfg
        self.model, self.block_size = model, block_size
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache(cfg, num_blocks, block_size, param.dtype, self.device)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        # Scatter the sequence over non-contiguous blocks so the block table really matters.
        self.blocks._free_plain.rotate(num_blocks // 3)
        self.table = BlockTable()
        self.length = 0

    def feed(self, token_ids: list[int]) -> torch.Tensor:
        """Compute the next tokens; returns logits for every one of them."""
        start, n, bs = self.length, len(token_ids), self.block_size
        assert self.blocks.grow(self.table, start + n)
        blocks = self.table.block_ids

        def on(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device)
        batch = ForwardBatch(
            input_ids=on(torch.tensor(token_ids)), positions=on(torch.arange(start, start + n)),
            slot_mapping=on(torch.tensor(slots_of(blocks, start, start + n, bs))),
            context_lens=on(torch.tensor([start + n])),
            block_tables=on(torch.tensor([blocks])), logits_indices=on(torch.arange(n)),
            attention=SdpaPlan([n], [start + n]))
        self.length += n
        return self.model(batch, self.cache.layers)


def greedy_in_every_mode(folder: Path, device: str, check, max_new_tokens: int = 10, **params) -> None:
    """The engine's greedy tokens for three prompts are the same in lock-step alone, overlap batched and
    lock-step batched; `check(engine)` runs on each engine first (what it loaded, how)."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    prompts = ["The old gate", "A merchant says", "Rain on the roof"]

    def run(overlap: bool, together: bool) -> list[list[int]]:
        with LLMEngine(folder, GeneratorParams(overlap_steps=overlap, **params), device=device) as eng:
            check(eng)
            reqs = [GenerationRequest(prompt=p, max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
                    for p in prompts]
            if together:
                return [r.tokens for r in eng.generate(reqs)]
            return [eng.generate([r])[0].tokens for r in reqs]

    baseline = run(False, False)
    assert run(True, True) == baseline and run(False, True) == baseline

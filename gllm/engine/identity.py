"""What identifies a loaded model for the things that outlive the process (KV snapshots in a save game, cached
results): a digest of its weights and one of its tokenizer + chat template.

The weights digest hashes the config and, per tensor, its name, shape and 1,024 evenly spaced values (as
float32): reading every byte of a 1B model would take seconds at load, and any other checkpoint (another
fine-tune, another seed) differs in those samples. It is computed once, when first asked for.
"""

from __future__ import annotations

import hashlib
import json

import torch

from gllm.model import LlamaForCausalLM, ModelConfig
from gllm.tokenizer import Tokenizer

SAMPLES_PER_TENSOR = 1024


@torch.no_grad()
def weights_digest(model: LlamaForCausalLM, cfg: ModelConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True, default=str).encode())
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = torch.linspace(0, flat.numel() - 1, count, device=flat.device).long()
        h.update(f"{name}:{tuple(param.shape)}".encode())
        h.update(flat[index].float().cpu().numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    h = hashlib.sha256(tokenizer.hf_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens, sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.eos_token_ids)).encode())
    if tokenizer.has_chat_template:
        h.update(tokenizer.get_chat_template().source.encode())
    return h.hexdigest()

"""What identifies a loaded model for the things that outlive the process (KV snapshots in a save game, cached
results): a digest of its weights and one of its tokenizer + chat template.

The weights digest hashes the config and, per tensor, its name, shape and 1,024 evenly spaced values (as
float32): reading every byte of a 1B model would take seconds at load, and any other checkpoint (another
fine-tune, another seed) differs in those samples. The tokenizer digest likewise hashes 4,096 evenly spaced
vocabulary entries, every added token, the BOS/EOS ids and the chat template (serialising a 128k-token
vocabulary takes half a second). Both are computed once, when first asked for (a few milliseconds).
"""

from __future__ import annotations

import hashlib
import json

import torch

from gllm.model import LlamaForCausalLM, ModelConfig
from gllm.model.quantized import QUANTIZED_LINEARS, GpuQuantizedLinear, QuantizedEmbedding, QuantizedLinear
from gllm.ops.quant import Int4Weight, QuantizedWeight, StackedWeight
from gllm.tokenizer import Tokenizer

SAMPLES_PER_TENSOR = 1024
VOCAB_SAMPLES = 4096


def _spread(n: int, count: int) -> list[int]:
    """`count` evenly spaced indices in [0, n) (integer arithmetic: exact for any n)."""
    count = min(count, n)
    return [i * (n - 1) // max(count - 1, 1) for i in range(count)]


@torch.no_grad()
def weights_digest(model: LlamaForCausalLM, cfg: ModelConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True, default=str).encode())
    # quantized projections and embeddings (no parameters): their format and bytes, so a snapshot taken with a
    # GGUF's own blocks is refused by the same file dequantized, whose KV differs slightly
    h.update(json.dumps([(name, m.scheme, m.nbytes) for name, m in model.named_modules()
                         if isinstance(m, (*QUANTIZED_LINEARS, QuantizedEmbedding))]).encode())
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    # an embedding or head kept quantized is sampled in its stored codes and scales, as it was in its values
    # when it was a parameter
    params += [(f"{name}.{part}", tensor) for name, part, tensor in _quantized_ends(model)]
    samples = []   # gathered where the weights are, then copied to the host at once (one sync on a GPU)
    for _, param in params:
        flat = param.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        index = torch.arange(count, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        samples.append(flat[index].float())
    values = torch.cat(samples).cpu().numpy() if samples else None
    start = 0
    for (name, param), sample in zip(params, samples):
        h.update(f"{name}:{tuple(param.shape)}".encode())
        h.update(values[start:start + sample.numel()].tobytes())
        start += sample.numel()
    return h.hexdigest()


def _quantized_ends(model: LlamaForCausalLM) -> list[tuple[str, str, torch.Tensor]]:
    found = []
    for name in ("embed_tokens", "lm_head"):
        module = getattr(model, name)
        if isinstance(module, QuantizedLinear):   # the CPU's formats (gllm.ops.quant)
            found += [(name, part, t) for part, t in _cpu_tensors(module.qweight)]
            continue
        weights = [module.qweight] if isinstance(module, QuantizedEmbedding) else \
            module.parts if isinstance(module, GpuQuantizedLinear) else []
        for i, w in enumerate(weights):   # the GPU layout (gllm.ops.quant_layout)
            found += [(name, f"{i}.words", w.words), (name, f"{i}.scale", w.scale)]
    return found


def _cpu_tensors(weight: QuantizedWeight, at: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(weight, StackedWeight):
        return [item for i, part in enumerate(weight.parts) for item in _cpu_tensors(part, f"{at}{i}.")]
    if isinstance(weight, Int4Weight):
        return [(f"{at}packed", weight.packed), (f"{at}scales_and_zeros", weight.scales_and_zeros)]
    return [(f"{at}q", weight.q), (f"{at}scale", weight.scale)]


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    hf = tokenizer.hf_tokenizer
    pieces = [hf.id_to_token(i) for i in _spread(tokenizer.vocab_size, VOCAB_SAMPLES)]
    added = sorted((i, t.content, t.special) for i, t in hf.get_added_tokens_decoder().items())
    h = hashlib.sha256(json.dumps([tokenizer.vocab_size, pieces, added, tokenizer.bos_token_id]).encode())
    h.update(json.dumps(tokenizer.special_tokens, sort_keys=True).encode())
    h.update(json.dumps(sorted(tokenizer.eos_token_ids)).encode())
    if tokenizer.has_chat_template:
        h.update(tokenizer.get_chat_template().source.encode())
    return h.hexdigest()

"""The weights digest (`gllm.engine.identity`): what tells a saved KV snapshot's model from another."""

from __future__ import annotations

import torch

from gllm.engine.identity import weights_digest
from gllm.model import load_hf_folder
from gllm.model.quantized import GpuQuantizedLinear, QuantizedEmbedding
from gllm.ops.quant_layout import quantize


def test_an_embedding_and_head_kept_quantized_still_tell_models_apart(llama32_dir):
    """On a GPU the embedding and head may be kept quantized (no parameters): the digest samples their codes and
    scales as it sampled their values, so two models differing there differ, and the same one is stable. The
    digest reads no kernel: CPU tensors stand in for the GPU layout here."""
    def digest(tuned: bool) -> str:
        model, cfg = load_hf_folder(llama32_dir, dtype=torch.float32, device="cpu", max_positions=256)[:2]
        weight = model.embed_tokens.weight.detach().clone()
        if tuned:   # another fine-tune: every row moved a little
            weight += 0.01 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
        q = quantize(weight, 8, 32)
        model.embed_tokens = QuantizedEmbedding(q, "int8", torch.float32)
        if cfg.tie_word_embeddings:
            model.lm_head = GpuQuantizedLinear([q], "int8")
        return weights_digest(model, cfg)

    assert digest(False) == digest(False)
    assert digest(False) != digest(True)


def test_a_head_kept_in_its_blocks_on_the_cpu_is_part_of_the_digest(tmp_path):
    """A GGUF's untied head kept as int4 planes on the CPU: two files differing in it alone differ."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    from test_quantization import GGUF_FORMATS, write_gguf

    from gllm.formats.gguf_quants import PLANE_TYPES
    from gllm.model.gguf_loader import load_gguf
    from gllm.model.quantized import QuantizedLinear

    path = write_gguf(tmp_path / "head.gguf", GGUF_FORMATS["Q4_K"][0], "F16", "Q6_K")
    model, cfg, _ = load_gguf(path, dtype=torch.float32, device="cpu", max_positions=64, keep_types=PLANE_TYPES)
    assert isinstance(model.lm_head, QuantizedLinear)
    before = weights_digest(model, cfg)
    assert weights_digest(model, cfg) == before
    packed = model.lm_head.qweight.packed
    packed.copy_(packed ^ 0x11)   # every code moved: another head
    assert weights_digest(model, cfg) != before

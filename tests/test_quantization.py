"""Weight-only int8 / int4 quantization on load (CPU): the kernels against the formats' own arithmetic, the
model against the same model with the quantized values written back as floats (exact up to float rounding)
and against the float model (a stated tolerance), and the engine's greedy output stable across modes."""

from __future__ import annotations

import pytest
import torch

from gllm.model import load_hf_folder
from gllm.model.quantized import PROJECTIONS, QuantConfig, QuantizedLinear, quantize_layers
from gllm.ops.quant import check_int4_shape, quant_matmul, quantize_int4, quantize_int8

from helpers import Stepper

PROMPT = list(range(300, 340))


def reference_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 format's arithmetic, written out: (dequantized weight, per-row scale)."""
    scale = w.abs().amax(dim=1) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None], scale


def reference_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 format's arithmetic: each group's min + scale * q, q in [0, 15]; (dequantized, scale per group)."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    q = torch.round((g - lo) / scale).clamp(0, 15)
    return (lo + q * scale).reshape(n, k), scale.squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_is_the_formats_arithmetic(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(96, 160), torch.randn(5, 160)
    deq, scale = reference_int8(w)
    assert (w - deq).abs().le(scale[:, None] / 2 + 1e-6).all()          # round to nearest
    y = quant_matmul(x.to(dtype), quantize_int8(w, dtype)).float()
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(y, x.to(dtype).float() @ deq.T, atol=tol * (x @ deq.T).abs().max().item())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_product_is_the_formats_arithmetic(group, dtype):
    torch.manual_seed(1)
    w, x = torch.randn(64, 256) * 0.1, torch.randn(3, 7, 256)    # extra leading dims are kept
    deq, scale = reference_int4(w, group)
    assert (w - deq).abs().le(scale.repeat_interleave(group, dim=1) / 2 + 1e-6).all()
    qw = quantize_int4(w, group, dtype)
    y = quant_matmul(x.to(dtype), qw).float()
    assert y.shape == (3, 7, 64)
    want = x.to(dtype).float() @ deq.T
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(y, want, atol=tol * want.abs().max().item())
    assert qw.nbytes < w.nbytes / 4                                        # about half a byte a weight


def test_shapes_and_settings_int4_cannot_take_are_clear_errors():
    assert check_int4_shape(64, 256, 32) is None
    assert "multiple of the group size" in check_int4_shape(64, 96, 64)
    assert "N % 8" in check_int4_shape(60, 256, 32)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(64, 256), 48, torch.float32)
    with pytest.raises(ValueError, match="quantization must be one of int8, int4"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="quant_group_size"):
        QuantConfig("int4", 48)
    from gllm.engine import GeneratorParams
    with pytest.raises(ValueError, match="quantization"):
        GeneratorParams(quantization="fp8")


def load(folder):
    return load_hf_folder(folder, dtype=torch.float32, device="cpu", max_positions=1024)[0]


def fake_quantized(folder, scheme: str, group: int = 32):
    """The float model with every projection's weight replaced by its dequantized value (the reference)."""
    model = load(folder)
    for layer in model.layers:
        for path in PROJECTIONS:
            owner, attr = path.split(".")
            linear = getattr(getattr(layer, owner), attr)
            w = linear.weight.data
            linear.weight.data = reference_int8(w)[0] if scheme == "int8" else reference_int4(w, group)[0]
    return model


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_a_quantized_model_computes_exactly_its_quantized_weights(llama32_dir, scheme, block_size):
    """Prefill and 8 decode steps through the paged cache: the packed kernels give the logits of the same
    model holding the dequantized weights as floats (float32 rounding apart)."""
    model = load(llama32_dir)
    report = quantize_layers(model, QuantConfig(scheme, compute_dtype=torch.float32))
    # int4 in float32: 4 bits a weight + a float32 scale and zero per 32 weights (2 bits more)
    assert report.fallbacks == [] and report.quantized_bytes < report.float_bytes / (3 if scheme == "int8" else 5)
    assert all(isinstance(getattr(getattr(layer, p.split(".")[0]), p.split(".")[1]), QuantizedLinear)
               for layer in model.layers for p in PROJECTIONS)
    quantized, reference = Stepper(model, block_size), Stepper(fake_quantized(llama32_dir, scheme), block_size)
    a, b = quantized.feed(PROMPT), reference.feed(PROMPT)
    for token in range(8):
        a = torch.cat([a, quantized.feed([500 + token])])
        b = torch.cat([b, reference.feed([500 + token])])
    assert torch.allclose(a, b, atol=1e-3 * b.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_logits_stay_close_to_the_float_model(llama32_dir, scheme, tolerance):
    """Against the float model, with the default bfloat16 products: the largest logit difference within
    `tolerance` x the largest logit, and the logit rows still point the same way (cosine). Random tiny weights
    are a hard case for 4 bits (uniform values, no outliers to spare), hence int4's wide bound; the exactness
    test above (float32 products) pins the arithmetic."""
    float_logits = Stepper(load(llama32_dir), 16).feed(PROMPT)
    model = load(llama32_dir)
    quantize_layers(model, QuantConfig(scheme))
    logits = Stepper(model, 16).feed(PROMPT)
    assert (logits - float_logits).abs().max() <= tolerance * float_logits.abs().max()
    cosine = torch.nn.functional.cosine_similarity(logits, float_logits, dim=-1)
    assert cosine.min() > (0.99 if scheme == "int8" else 0.8), cosine.min()


def test_the_engine_runs_quantized_weights_with_the_same_greedy_text_in_every_mode(llama32_dir):
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    prompts = ["The old gate", "A merchant says", "Rain on the roof"]

    def run(overlap: bool, together: bool) -> list[list[int]]:
        params = GeneratorParams(quantization="int4", dtype="float32", cpu_threads=1, overlap_steps=overlap)
        with LLMEngine(llama32_dir, params, device="cpu") as eng:
            assert eng.weight_format.startswith("int4 projections")
            assert eng.stats()["weight_bytes"] == eng.weight_bytes
            reqs = [GenerationRequest(prompt=p, max_new_tokens=10, temperature=0.0, ignore_eos=True)
                    for p in prompts]
            if together:
                return [r.tokens for r in eng.generate(reqs)]
            return [eng.generate([r])[0].tokens for r in reqs]

    baseline = run(False, False)
    assert run(True, True) == baseline and run(False, True) == baseline


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory, llama32_dir, tokenizer_dir):
    """The tiny Llama 3.2 written as a GGUF whose projections are Q4_0 and Q4_1 blocks (gguf's quantizer)."""
    import test_gguf
    types = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_1", "attn_output": "Q4_1", "ffn_gate": "Q4_1",
             "ffn_up": "Q4_0", "ffn_down": "Q8_0"}
    saved = dict(test_gguf.TENSOR_TYPES)
    test_gguf.TENSOR_TYPES.update(types)
    try:
        return test_gguf.write_llama3_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4.gguf", llama32_dir, tokenizer_dir)
    finally:
        test_gguf.TENSOR_TYPES.clear()
        test_gguf.TENSOR_TYPES.update(saved)


def test_gguf_4bit_blocks_are_packed_as_they_are(q4_gguf):
    """Q4_0 / Q4_1 projections go into the int4 kernels without requantizing: the model computes exactly
    gguf's own dequantized weights (float32 products); a projection with a part in another type (down:
    Q8_0) is quantized from its float values instead."""
    from gllm.model.gguf_loader import GGUFInt4Blocks, load_gguf
    reference, cfg, _ = load_gguf(q4_gguf, dtype=torch.float32, device="cpu", max_positions=1024)
    model, _, _ = load_gguf(q4_gguf, dtype=torch.float32, device="cpu", max_positions=1024)
    report = quantize_layers(model, QuantConfig("int4", compute_dtype=torch.float32),
                             GGUFInt4Blocks(q4_gguf, cfg).groups)
    assert report.exact == 3 * cfg.num_hidden_layers          # qkv, o and gate_up of every layer; not down
    # down was requantized (int4 from its Q8_0 values): put the reference's back, so what is compared is exact
    assert all(isinstance(layer.mlp.down_proj, QuantizedLinear) for layer in model.layers)
    for layer, ref_layer in zip(model.layers, reference.layers):
        layer.mlp.down_proj = ref_layer.mlp.down_proj
    exact_logits, float_logits = Stepper(model, 16).feed(PROMPT), Stepper(reference, 16).feed(PROMPT)
    assert torch.allclose(exact_logits, float_logits, atol=1e-4 * float_logits.abs().max().item()), \
        (exact_logits - float_logits).abs().max()


def test_a_4bit_block_decoder_refuses_other_types_and_short_rows():
    import numpy as np

    from gllm.formats.gguf_quants import int4_groups
    with pytest.raises(ValueError, match="not 4-bit affine"):
        int4_groups("Q8_0", np.zeros((2, 34), np.uint8), 32)
    with pytest.raises(ValueError, match="do not hold 64 weights"):
        int4_groups("Q4_1", np.zeros((2, 20), np.uint8), 64)

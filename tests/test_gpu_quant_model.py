"""Quantized weights on a GPU (issue 22): a GGUF's blocks kept as they are and int8/int4 quantization on load,
run by the Triton kernels (`GpuQuantizedLinear`), against the same weights as floats. Skipped without CUDA and
Triton (run by tools/gpu_check.sh on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run on a GPU machine")
pytest.importorskip("triton", reason="Triton is not installed")

from test_quantization import GGUF_FORMATS, HIDDEN, LAYERS, VOCAB, write_gguf  # noqa: E402

from gllm.formats.gguf_quants import PLANE_TYPES  # noqa: E402
from gllm.model import load_hf_folder  # noqa: E402
from gllm.model.gguf_loader import load_gguf  # noqa: E402
from gllm.model.kernels import ModelKernels  # noqa: E402
from gllm.model.quantized import (  # noqa: E402
    PROJECTIONS,
    GpuQuantizedLinear,
    QuantConfig,
    QuantizedEmbedding,
    head_formats,
    quantize_embeddings,
    quantize_layers,
    weight_bytes,
)
from gllm.ops.quant_layout import dequantize  # noqa: E402

from helpers import Stepper, greedy_in_every_mode  # noqa: E402

CUDA = torch.device("cuda")


def steps(model, prefill: int = 40, decode: int = 16, block_size: int = 16) -> torch.Tensor:
    """Logits of a prefill (dense products past the GEMV's rows) and decode steps (the quantized GEMV)."""
    stepper = Stepper(model, block_size, num_blocks=128)
    logits = [stepper.feed([(5 * i + 3) % VOCAB for i in range(prefill)])]
    logits += [stepper.feed([(7 * t + 11) % VOCAB]) for t in range(decode)]
    return torch.cat(logits).float()


def projections(model) -> list:
    return [getattr(getattr(layer, p.split(".")[0]), p.split(".")[1]) for layer in model.layers for p in PROJECTIONS]


@pytest.fixture(scope="module", params=list(GGUF_FORMATS))
def gguf_file(request, tmp_path_factory):
    return request.param, write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf",
                                     *GGUF_FORMATS[request.param])


@pytest.mark.parametrize("block_size", [1, 16])
def test_a_gguf_runs_on_its_own_blocks_on_the_gpu(gguf_file, block_size):
    """Every projection stays in the file's blocks (affine codes, no float copy), and prefill + 16 decode steps
    give the logits of the same file dequantized to float32 by gguf: float32 activations exactly but for
    float32 rounding where the layout keeps the file's scales (Q4_K and Q6_K in their own bytes, the other
    types' float16 scales), within 0.5 % of the largest logit for Q5_K (float16 d x sc products), bfloat16
    activations within 8 % (cosine > 0.999: decode rows go through the integer row kernel, x rounded to int8
    per block of 32, which adds to bfloat16's own rounding; Q4_0 measured 5.4 % with it, and the fused decode
    path's head rounds differently again)."""
    name, path = gguf_file
    reference = steps(load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024)[0], block_size=block_size)
    model = load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024, keep_types=PLANE_TYPES)[0]
    assert all(isinstance(m, GpuQuantizedLinear) for m in projections(model))
    assert len(projections(model)) == len(PROJECTIONS) * LAYERS
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
    got = steps(model, block_size=block_size)
    tol = 5e-3 if name == "Q5_K" else 1e-4                        # the file's own scales: nothing rounds
    assert (got - reference).abs().max() <= tol * reference.abs().max(), (name, (got - reference).abs().max())
    model.use_kernels(ModelKernels(fused=True, streamed_rows=1))      # decode rows through the fused row kernel
    fused = steps(model, block_size=block_size)
    assert (fused - reference).abs().max() <= tol * reference.abs().max(), (name, (fused - reference).abs().max())
    bf16_model = load_gguf(path, dtype=torch.bfloat16, device=CUDA, max_positions=1024, keep_types=PLANE_TYPES)[0]
    for kernels in (None, ModelKernels(fused=True, streamed_rows=1)):
        if kernels is not None:
            bf16_model.use_kernels(kernels)
        bf16 = steps(bf16_model, block_size=block_size)
        error = ((bf16 - reference).abs().max() / reference.abs().max()).item()
        cosine = torch.nn.functional.cosine_similarity(bf16, reference, dim=-1).min().item()
        print(f"{name} block {block_size} {kernels}: bf16 error {error:.4f} of the largest, cosine {cosine:.6f}")
        assert error <= 0.05 and cosine > 0.998, (name, error, cosine)


@pytest.mark.parametrize("embeddings, output", [("Q4_K", "Q6_K"), ("Q6_K", None), ("Q8_0", "F32")])
def test_the_embeddings_and_the_head_stay_in_their_blocks_on_the_gpu(tmp_path, embeddings, output):
    """A GGUF's quantized token embedding and head are kept as affine codes on the GPU (one weight when tied,
    counted once), and give the logits of the file dequantized by gguf, in both decode paths."""
    path = write_gguf(tmp_path / "ends.gguf", GGUF_FORMATS["Q4_K"][0], embeddings, output)
    reference = steps(load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024)[0])
    model = load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024, keep_types=PLANE_TYPES)[0]
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and model.embed_tokens.scheme == embeddings
    assert isinstance(model.lm_head, GpuQuantizedLinear) == (output != "F32")
    if output is None:
        assert model.lm_head.parts[0] is model.embed_tokens.qweight and "(tied)" in head_formats(model)
    names = [n for n, _ in model.named_parameters()]
    assert not any("embed" in n for n in names) and any("lm_head" in n for n in names) == (output == "F32")
    # the kept matrices at the file's own bits a weight (Q4_K 4.5, Q6_K 6.5625, Q8_0 8.5), each counted once in
    # the weight bytes
    kept = [model.embed_tokens.qweight, *getattr(model.lm_head, "parts", [])]
    ends = {id(w.words): w.nbytes for w in kept}
    assert len(ends) == (1 if output in (None, "F32") else 2)
    bits = {"q4_k": 4.5, "q6_k": 6.5625, "affine": 8.5}
    assert all(w.nbytes * 8 == VOCAB * HIDDEN * bits[w.kind] for w in kept)
    rest = [model.norm, model.rope] + ([model.lm_head] if output == "F32" else [])
    assert weight_bytes(model) == weight_bytes(model.layers) + sum(ends.values()) + sum(
        t.nbytes for m in rest for t in [*m.parameters(), *m.buffers()])
    for kernels in (None, ModelKernels(fused=True, streamed_rows=1)):
        if kernels is not None:
            model.use_kernels(kernels)
        got = steps(model)
        assert (got - reference).abs().max() <= 1e-2 * reference.abs().max(), (got - reference).abs().max()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantization_on_load_computes_exactly_its_quantized_weights(llama32_dir, scheme):
    """int4 / int8 on load, on the GPU: the logits of the same model holding the dequantized weights as floats
    (float32 rounding apart); the projections take under a fifth (int4) / a third (int8) of float32's bytes;
    the head takes int8 (the tied embedding with it)."""
    model = load_hf_folder(llama32_dir, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    report = quantize_layers(model, QuantConfig(scheme))
    assert report.fallbacks == []
    assert report.quantized_bytes < report.float_bytes / (3 if scheme == "int8" else 5)
    tied = model.lm_head is None
    assert quantize_embeddings(model, QuantConfig(scheme)) == (
        ["head int8", "embeddings int8 (tied to the head)"] if tied else ["head int8", f"embeddings {scheme}"])
    reference = load_hf_folder(llama32_dir, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    for q, linear in zip(projections(model), projections(reference)):
        assert isinstance(q, GpuQuantizedLinear) and q.scheme == scheme
        linear.weight.data = torch.cat([dequantize(part) for part in q.parts])
    reference.embed_tokens.weight.data = dequantize(model.embed_tokens.qweight)
    if reference.lm_head is not None:
        reference.lm_head.weight.data = dequantize(model.lm_head.parts[0])
    got, want = steps(model), steps(reference)
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()
    # the fast path's decode: one row through the fused row kernel (norms and residual adds folded in)
    model.use_kernels(ModelKernels(fused=True, streamed_rows=1))
    fused = steps(model)
    assert torch.allclose(fused, want, rtol=0, atol=1e-4 * want.abs().max().item()), (fused - want).abs().max()
    with pytest.raises(ValueError, match="one row at a time"):
        model.use_kernels(ModelKernels(fused=True, streamed_rows=4))


def test_q4_k_m_on_load_mixes_as_llama_cpp_and_computes_exactly_its_quantized_weights(tmp_path):
    """q4_k_m on load: Q4_K, with Q6_K for the head and for v and down in llama.cpp's "more bits" layers (the
    second of two); the logits of the same model holding the dequantized weights as floats, in both decode
    paths."""
    path = write_gguf(tmp_path / "f16.gguf", {p: "F16" for p in GGUF_FORMATS["Q4_K"][0]}, "F16", "F16")
    model = load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    config = QuantConfig("q4_k_m")
    assert quantize_layers(model, config).fallbacks == []
    assert quantize_embeddings(model, config) == ["head q6_k", "embeddings q4_k"]
    assert LAYERS == 2
    assert [q.scheme for q in projections(model)] == ["q4_k"] * 4 + ["q4_k/q6_k", "q4_k", "q4_k", "q6_k"]
    reference = load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    for q, linear in zip(projections(model), projections(reference)):
        linear.weight.data = torch.cat([dequantize(part) for part in q.parts])
    reference.embed_tokens.weight.data = dequantize(model.embed_tokens.qweight)
    reference.lm_head.weight.data = dequantize(model.lm_head.parts[0])
    want = steps(reference)
    for kernels in (None, ModelKernels(fused=True, streamed_rows=1)):
        if kernels is not None:
            model.use_kernels(kernels)
        got = steps(model)
        assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()


def test_the_engine_runs_quantized_weights_on_the_gpu_with_the_same_greedy_text_in_every_mode(llama32_dir):
    """With the fast path (fused kernels, decode graphs): greedy text identical in lockstep and overlap, alone
    and batched; the weight format says what is loaded. float32 activations: one row and several rows take
    different kernels (summing in different orders), which bfloat16 rounding could turn into a different
    argmax on a random model's near-ties."""
    def check(eng) -> None:
        assert eng.weight_format.startswith("int4 projections"), eng.weight_format
        assert "head int8, embeddings int8 (tied)" in eng.weight_format, eng.weight_format
        assert eng.fast_path.decode_graphs and eng.fast_path.kernels.streamed_rows == 1

    greedy_in_every_mode(llama32_dir, "cuda", check, max_new_tokens=12, quantization="int4", dtype="float32",
                         max_seq_len=256)

"""Quantized weights on a GPU (issue 22): a GGUF's blocks kept as they are and int8/int4 quantization on load,
run by the Triton kernels (`GpuQuantizedLinear`), against the same weights as floats. Skipped without CUDA and
Triton (run by tools/gpu_check.sh on the GPU machine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: run on a GPU machine")
pytest.importorskip("triton", reason="Triton is not installed")

from test_quantization import GGUF_FORMATS, LAYERS, VOCAB, write_gguf  # noqa: E402

from gllm.formats.gguf_quants import PLANE_TYPES  # noqa: E402
from gllm.model import load_hf_folder  # noqa: E402
from gllm.model.gguf_loader import load_gguf  # noqa: E402
from gllm.model.kernels import ModelKernels  # noqa: E402
from gllm.model.quantized import PROJECTIONS, GpuQuantizedLinear, QuantConfig, quantize_layers  # noqa: E402
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
    give the logits of the same file dequantized to float32 by gguf: float32 activations within 0.5 % of the
    largest logit (the kernels' layout stores scales in float16, which rounds the K-quants' d x sc products;
    the other types' scales are float16 in the file), bfloat16 activations within 5 % (cosine > 0.999: the fused
    decode path's head is the bfloat16 streamed GEMV, whose rounding differs from a plain linear's)."""
    name, path = gguf_file
    reference = steps(load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024)[0], block_size=block_size)
    model = load_gguf(path, dtype=torch.float32, device=CUDA, max_positions=1024, keep_types=PLANE_TYPES)[0]
    assert all(isinstance(m, GpuQuantizedLinear) for m in projections(model))
    assert len(projections(model)) == len(PROJECTIONS) * LAYERS
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
    got = steps(model, block_size=block_size)
    exact = name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")        # float16 scales in the file: nothing rounds
    tol = 1e-4 if exact else 5e-3
    assert (got - reference).abs().max() <= tol * reference.abs().max(), (name, (got - reference).abs().max())
    model.use_kernels(ModelKernels(fused=True, streamed_rows=1))      # decode rows through the fused row kernel
    fused = steps(model, block_size=block_size)
    assert (fused - reference).abs().max() <= tol * reference.abs().max(), (name, (fused - reference).abs().max())
    bf16_model = load_gguf(path, dtype=torch.bfloat16, device=CUDA, max_positions=1024, keep_types=PLANE_TYPES)[0]
    for kernels in (None, ModelKernels(fused=True, streamed_rows=1)):
        if kernels is not None:
            bf16_model.use_kernels(kernels)
        bf16 = steps(bf16_model, block_size=block_size)
        assert (bf16 - reference).abs().max() <= 0.05 * reference.abs().max(), (name, (bf16 - reference).abs().max())
        assert torch.nn.functional.cosine_similarity(bf16, reference, dim=-1).min() > 0.999


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantization_on_load_computes_exactly_its_quantized_weights(llama32_dir, scheme):
    """int4 / int8 on load, on the GPU: the logits of the same model holding the dequantized weights as floats
    (float32 rounding apart); the projections take under a fifth (int4) / a third (int8) of float32's bytes."""
    model = load_hf_folder(llama32_dir, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    report = quantize_layers(model, QuantConfig(scheme))
    assert report.fallbacks == []
    assert report.quantized_bytes < report.float_bytes / (3 if scheme == "int8" else 5)
    reference = load_hf_folder(llama32_dir, dtype=torch.float32, device=CUDA, max_positions=1024)[0]
    for q, linear in zip(projections(model), projections(reference)):
        assert isinstance(q, GpuQuantizedLinear) and q.scheme == scheme
        linear.weight.data = torch.cat([dequantize(part) for part in q.parts])
    got, want = steps(model), steps(reference)
    assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item()), (got - want).abs().max()
    # the fast path's decode: one row through the fused row kernel (norms and residual adds folded in)
    model.use_kernels(ModelKernels(fused=True, streamed_rows=1))
    fused = steps(model)
    assert torch.allclose(fused, want, rtol=0, atol=1e-4 * want.abs().max().item()), (fused - want).abs().max()
    with pytest.raises(ValueError, match="one row at a time"):
        model.use_kernels(ModelKernels(fused=True, streamed_rows=4))


def test_the_engine_runs_quantized_weights_on_the_gpu_with_the_same_greedy_text_in_every_mode(llama32_dir):
    """With the fast path (fused kernels, decode graphs): greedy text identical in lockstep and overlap, alone
    and batched; the weight format says what is loaded. float32 activations: one row and several rows take
    different kernels (summing in different orders), which bfloat16 rounding could turn into a different
    argmax on a random model's near-ties."""
    def check(eng) -> None:
        assert eng.weight_format.startswith("int4 projections"), eng.weight_format
        assert eng.fast_path.decode_graphs and eng.fast_path.kernels.streamed_rows == 1

    greedy_in_every_mode(llama32_dir, "cuda", check, max_new_tokens=12, quantization="int4", dtype="float32",
                         max_seq_len=256)

"""Weight-only int8 / int4 quantization on load (CPU): the kernels against the formats' own arithmetic, the
model against the same model with the quantized values written back as floats (exact up to float rounding)
and against the float model (a stated tolerance), and the engine's greedy output stable across modes."""

from __future__ import annotations

import pytest
import torch

from gllm.model import load_hf_folder
from gllm.model.quantized import PROJECTIONS, QuantConfig, QuantizedLinear, quantize_layers
from gllm.ops.quant import check_int4_shape, quant_matmul, quantize_int4, quantize_int8

from helpers import Stepper, greedy_in_every_mode

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
    assert "N % 16" in check_int4_shape(56, 256, 32)
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(64, 256), 48, torch.float32)
    with pytest.raises(ValueError, match="quantization must be one of float, int8, int4, q4_k_m"):
        QuantConfig("int3")
    with pytest.raises(ValueError, match="quant_group_size"):
        QuantConfig("int4", 48)
    from gllm.engine import GeneratorParams
    with pytest.raises(ValueError, match="quantization"):
        GeneratorParams(quantization="fp8")


def test_q4_k_m_on_load_is_a_clear_error_on_the_cpu(llama32_dir):
    """llama.cpp's Q4_K_M mix on load is the GPU kernels' (the CPU's take int8 and int4): refused before
    anything is loaded, naming the choice."""
    from gllm.engine import GeneratorParams, LLMEngine
    with pytest.raises(ValueError, match="q4_k_m.*CUDA GPUs.*int8 or int4"):
        LLMEngine(llama32_dir, GeneratorParams(quantization="q4_k_m"), device="cpu")
    model = load(llama32_dir)
    with pytest.raises(ValueError, match="q4_k_m weights run on CUDA GPUs, not on cpu"):
        quantize_layers(model, QuantConfig("q4_k_m"))


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
    def check(eng) -> None:
        assert eng.weight_format.startswith("int4 projections")
        assert eng.stats()["weight_bytes"] == eng.weight_bytes

    greedy_in_every_mode(llama32_dir, "cpu", check, quantization="int4", dtype="float32", cpu_threads=1)


# --- GGUF files kept quantized --------------------------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 256, 512, 2, 4, 2, 320    # K-quants need rows of 256
# Each file: its projections' types (llama.cpp's Q4_K_M mix: v and down at 6 bits), embeddings, output head.
GGUF_FORMATS = {t: ({p: t for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
                    "F16", None) for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}
GGUF_FORMATS["Q4_K_M"] = ({"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K",
                           "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}, "Q4_K", "Q6_K")


def write_gguf(path, projections: dict[str, str], embeddings: str, output: str | None, seed: int = 0,
               tokenizer: bool = False):
    """A small random Llama GGUF (no tokenizer: the model is all these tests read). Types gguf can write are
    quantized by gguf; the K-quants by tools/kquants.py (a valid encoding; gguf's dequantizer is the reference)."""
    import gguf
    import kquants
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(1024)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    if tokenizer:     # a byte-level BPE over a made-up vocabulary, enough for the engine to run
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe")
        w.add_token_list(["a", "b", "ab", "Ġ", "<s>", "</s>"] + [f"t{i}" for i in range(VOCAB - 6)])
        w.add_token_types([1, 1, 1, 1, 3, 3] + [1] * (VOCAB - 6))
        w.add_token_merges(["a b"])
        w.add_bos_token_id(4)
        w.add_eos_token_id(5)

    def add(name: str, shape: tuple[int, ...], type_name: str, std: float = 0.1) -> None:
        arr = (rng.standard_normal(shape) * std).astype(np.float32)
        if name.endswith("norm"):
            arr = 1 + arr
        q = getattr(gguf.GGMLQuantizationType, type_name)
        data = kquants.encode(arr, type_name) if type_name in kquants.TYPES else gguf.quants.quantize(arr, q)
        w.add_tensor(f"{name}.weight", data, raw_dtype=q if data.dtype == np.uint8 else None)

    kv = HEADS // KV_HEADS and HIDDEN // HEADS * KV_HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
              "ffn_down": (HIDDEN, FFN)}
    add("token_embd", (VOCAB, HIDDEN), embeddings, std=1.0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm", (HIDDEN,), "F32")
        add(f"blk.{i}.ffn_norm", (HIDDEN,), "F32")
        for part, shape in shapes.items():
            add(f"blk.{i}.{part}", shape, projections[part])
    add("output_norm", (HIDDEN,), "F32")
    if output is not None:
        add("output", (VOCAB, HIDDEN), output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=list(GGUF_FORMATS))
def gguf_file(request, tmp_path_factory):
    projections, embeddings, output = GGUF_FORMATS[request.param]
    return request.param, write_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", projections,
                                     embeddings, output)


def run_steps(model, block_size: int) -> torch.Tensor:
    """Logits of a 40-token prefill and 32 decode steps through the paged cache."""
    stepper = Stepper(model, block_size, num_blocks=128)
    logits = [stepper.feed(list(range(3, 43)))]
    for token in range(32):
        logits.append(stepper.feed([(7 * token + 11) % VOCAB]))
    return torch.cat(logits)


@pytest.mark.parametrize("block_size", [1, 16])
def test_a_gguf_runs_on_its_own_blocks(gguf_file, block_size):
    """Every projection stays in the file's blocks (int4 planes; no float copy of it anywhere) and the logits of
    prefill + 32 decode steps match the same file dequantized to float32 by gguf: within float32 rounding with
    float32 products (1e-4 of the largest logit), and within a stated 3 % of the largest logit (cosine of
    every row > 0.999) with the default bfloat16 products, whose activations and scales round to 8 bits."""
    from gllm.formats.gguf_quants import PLANE_TYPES
    from gllm.model.gguf_loader import load_gguf
    name, path = gguf_file

    def model(**kw):
        return load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024, **kw)[0]

    reference = run_steps(model(), block_size)
    exact = model(keep_types=PLANE_TYPES, compute_dtype=torch.float32)
    kept = [m for m in exact.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(kept) == len(PROJECTIONS) * LAYERS
    assert not any(n.endswith(("proj.weight",)) for n, _ in exact.named_parameters())   # no float projection
    got = run_steps(exact, block_size)
    assert torch.allclose(got, reference, rtol=0, atol=1e-4 * reference.abs().max().item()), \
        (name, (got - reference).abs().max())
    got = run_steps(model(keep_types=PLANE_TYPES), block_size)
    assert (got - reference).abs().max() <= 0.03 * reference.abs().max(), (name, (got - reference).abs().max())
    assert torch.nn.functional.cosine_similarity(got, reference, dim=-1).min() > 0.999


def test_int4_keeps_the_4bit_blocks_and_requantizes_the_rest(tmp_path):
    """quantization="int4" on a GGUF: 4-bit blocks (Q4_0 / Q4_1 / Q4_K) kept as they are, other types
    requantized from gguf's dequantized values; a projection with parts in both is requantized whole."""
    from gllm.formats.gguf_quants import INT4_TYPES
    from gllm.model.gguf_loader import load_gguf
    types = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q4_K", "attn_output": "Q8_0", "ffn_gate": "Q4_K",
             "ffn_up": "Q5_0", "ffn_down": "Q4_1"}
    path = write_gguf(tmp_path / "mixed.gguf", types, "F16", None)
    model = load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024, keep_types=INT4_TYPES)[0]
    layer = model.layers[0]
    assert layer.self_attn.qkv_proj.scheme == "Q4_0/Q4_1/Q4_K" and layer.mlp.down_proj.scheme == "Q4_1"
    assert not isinstance(layer.self_attn.o_proj, QuantizedLinear)
    assert not isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    report = quantize_layers(model, QuantConfig("int4"))
    assert report.fallbacks == [] and isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    assert layer.mlp.gate_up_proj.scheme == "int4" and layer.self_attn.qkv_proj.scheme == "Q4_0/Q4_1/Q4_K"


def test_the_engine_runs_a_gguf_on_its_blocks_and_counts_their_bytes(tmp_path):
    """The engine's default for a GGUF on the CPU: the file's blocks; its weight format names them and its
    weight bytes are what the planes and the float tensors take (Q8_0: 1.25 bytes a projection weight, two
    planes), below the float16 model's."""
    from gllm.engine import GeneratorParams
    from gllm.engine.assembly import assemble
    path = write_gguf(tmp_path / "q8.gguf", GGUF_FORMATS["Q8_0"][0], "F16", None, tokenizer=True)
    rt = assemble(path, GeneratorParams(dtype="float16", max_seq_len=256), "cpu")
    assert rt.weight_format == (f"{len(PROJECTIONS) * LAYERS} Q8_0 projections (GGUF blocks kept as they are) "
                                f"(bfloat16 products), float16 activations")
    per_layer = HIDDEN * (HIDDEN + 2 * HIDDEN // 2 + HIDDEN + 3 * FFN)       # q, k + v, o, gate + up + down
    planes = LAYERS * per_layer * 2 * (0.5 + 2 * 2 / 32)                    # nibbles + bf16 scale, zero a group
    flt = assemble(path, GeneratorParams(dtype="float16", max_seq_len=256, quantization="float"), "cpu")
    assert flt.weight_format == "float16"
    others = flt.weight_bytes - LAYERS * per_layer * 2                       # embeddings, norms, RoPE tables
    assert others >= VOCAB * HIDDEN * 2 and rt.weight_bytes == planes + others


@pytest.mark.parametrize("embeddings, output", [("Q8_0", "F32"), ("F16", "Q6_K")])
def test_embeddings_and_head_are_dequantized_row_chunk_by_row_chunk(tmp_path, monkeypatch, embeddings, output):
    """Non-projection tensors are dequantized by gguf into the model's dtype a few rows at a time (the peak
    memory of a load): the same values as gguf's dequantizer on the whole tensor."""
    import gguf
    import numpy as np

    from gllm.model.gguf_loader import GGUFTensor, load_gguf
    monkeypatch.setattr(GGUFTensor, "CHUNK_ROWS", 96)                 # 320 rows: 4 chunks, the last short
    path = write_gguf(tmp_path / "head.gguf", GGUF_FORMATS["Q4_K"][0], embeddings, output)
    model = load_gguf(path, dtype=torch.float32, device="cpu", max_positions=64, keep_types=("Q4_K",))[0]
    stored = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type))       # a copy: F32 is the file
              for t in gguf.GGUFReader(path).tensors}
    assert torch.equal(model.embed_tokens.weight, torch.from_numpy(stored["token_embd.weight"]))
    assert torch.equal(model.lm_head.weight, torch.from_numpy(stored["output.weight"].reshape(VOCAB, HIDDEN)))


@pytest.mark.parametrize("embeddings, output", [("Q8_0", None), ("F16", "Q6_K"), ("Q4_0", "F32")])
def test_the_head_stays_in_its_blocks_on_the_cpu(tmp_path, embeddings, output):
    """A GGUF's quantized head (or tied embedding) is kept as int4 planes on the CPU, its lookups reading the
    float table: prefill + decode logits those of the file dequantized by gguf (float32 products: within 1e-4
    of the largest, as the projections); a float head stays float."""
    from gllm.formats.gguf_quants import PLANE_TYPES
    from gllm.model.gguf_loader import load_gguf
    from gllm.model.quantized import QuantizedLinear, head_formats
    path = write_gguf(tmp_path / "head.gguf", GGUF_FORMATS["Q4_K"][0], embeddings, output)
    reference = run_steps(load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024)[0], 16)
    model = load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024, keep_types=PLANE_TYPES,
                      compute_dtype=torch.float32)[0]
    stored = output or embeddings
    assert isinstance(model.lm_head, QuantizedLinear) == (stored != "F32")
    assert head_formats(model) == ("" if stored == "F32" else f"head {stored}")
    assert isinstance(model.embed_tokens, torch.nn.Embedding)
    got = run_steps(model, 16)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max(), (got - reference).abs().max()
    half = load_gguf(path, dtype=torch.float16, device="cpu", max_positions=64, keep_types=PLANE_TYPES)[0]
    assert head_formats(half) == ""                   # float16's own matmul reads a head faster
    if output is None:   # tied: wide products may take the float table instead (ModelKernels.float_head_rows)
        from gllm.model.kernels import ModelKernels
        model.use_kernels(ModelKernels(float_head_rows=1))
        wide = run_steps(model, 16)
        assert (wide - reference).abs().max() <= 1e-4 * reference.abs().max()
        assert not torch.equal(wide, got)                           # the float table really ran


@pytest.mark.parametrize("name", ["Q4_K_M", "Q8_0"])
def test_a_long_prefill_dequantizes_and_gives_the_same_logits(tmp_path, name):
    """A 300-token prefill runs the wide products (weights dequantized block by block, one float32 GEMM), then
    8 decode steps the int4 kernel: both against the file dequantized by gguf, as in the test above."""
    from gllm.formats.gguf_quants import PLANE_TYPES
    from gllm.model.gguf_loader import load_gguf
    from gllm.ops.quant import WIDE_ROWS
    path = write_gguf(tmp_path / f"{name}.gguf", *GGUF_FORMATS[name])

    def steps(model) -> torch.Tensor:
        stepper = Stepper(model, 16, num_blocks=64)
        logits = [stepper.feed([(5 * i + 3) % VOCAB for i in range(300)])]
        logits += [stepper.feed([(7 * t + 11) % VOCAB]) for t in range(8)]
        return torch.cat(logits)

    assert 300 >= WIDE_ROWS
    reference = steps(load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024)[0])
    for compute, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.03)):
        model = load_gguf(path, dtype=torch.float32, device="cpu", max_positions=1024, keep_types=PLANE_TYPES,
                          compute_dtype=compute)[0]
        got = steps(model)
        assert (got - reference).abs().max() <= tol * reference.abs().max(), (compute, (got - reference).abs().max())


def test_the_streamed_decode_path_needs_projections_all_float_or_all_quantized(llama32_dir):
    """`forward_streamed` runs either the bfloat16 kernels or the quantized row kernels for every layer: a model
    mixing float and quantized projections (a file storing some in F16) keeps the fused path's products."""
    from gllm.model.kernels import ModelKernels
    model = load(llama32_dir)
    assert model.supports_streamed_kernels and not model.quantized_projections
    layer = model.layers[1]
    layer.mlp.down_proj = QuantizedLinear(quantize_int8(layer.mlp.down_proj.weight, torch.float32), None, "int8",
                                          torch.float32)
    assert not model.supports_streamed_kernels and not model.quantized_projections
    with pytest.raises(ValueError, match="all float or all quantized"):
        model.use_kernels(ModelKernels(fused=True, streamed_rows=1))
    quantize_layers(model, QuantConfig("int8"))
    assert model.supports_streamed_kernels and model.quantized_projections

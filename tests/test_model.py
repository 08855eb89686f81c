"""gllm.model against transformers: config forms, loading, logits of prefill and every decode step."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gllm.model import ModelConfig, load_hf_folder
from gllm.model.rope import rope_inv_freq

from helpers import Stepper, hf_greedy, hf_logits, hf_model

PROMPT = [128000, 9906, 1070, 11, 1268, 527, 499, 3815, 3432, 30, 358, 1097, 7060, 13, 578, 4062, 14198, 39935,
          35308, 927, 279, 16053, 5679, 13]


@pytest.fixture(scope="module", params=["llama32", "llama31"])
def model_dir(request, llama32_dir, llama31_dir):
    return {"llama32": llama32_dir, "llama31": llama31_dir}[request.param]


def load(folder, dtype="float32"):
    return load_hf_folder(folder, dtype=dtype, device="cpu", max_positions=1024)


def test_config_reads_both_rope_forms(llama32_dir, llama31_dir):
    new_form = json.loads((llama32_dir / "config.json").read_text())
    old_form = json.loads((llama31_dir / "config.json").read_text())
    assert "rope_parameters" in new_form and "rope_scaling" in old_form   # the fixtures cover both
    for cfg in (ModelConfig.from_hf_dict(new_form), ModelConfig.from_hf_dict(old_form)):
        assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 500000.0
    assert ModelConfig.from_hf_dict(new_form).rope.factor == 32.0
    assert ModelConfig.from_hf_dict(old_form).rope.factor == 8.0
    assert ModelConfig.from_hf_dict(new_form).tie_word_embeddings
    assert not ModelConfig.from_hf_dict(old_form).tie_word_embeddings


def test_llama3_inv_freq_matches_transformers(model_dir):
    ref = hf_model(model_dir).model.rotary_emb.inv_freq
    cfg = ModelConfig.from_json(model_dir / "config.json")
    assert torch.allclose(rope_inv_freq(cfg.rope, cfg.head_dim), ref.float(), rtol=0, atol=1e-12)


def test_prefill_and_decode_logits_match_transformers(model_dir):
    """Prefill the prompt, then decode 32 greedy tokens one at a time: every logit row within 1e-4."""
    model, _ = load(model_dir)
    continuation = hf_greedy(model_dir, PROMPT, 32)
    reference = hf_logits(model_dir, PROMPT + continuation)
    for block_size in (1, 16, 7):
        stepper = Stepper(model, block_size)
        got = [stepper.feed(PROMPT)]
        got += [stepper.feed([t]) for t in continuation]
        got = torch.cat(got)
        assert (got - reference).abs().max().item() <= 1e-4, block_size
        assert got[len(PROMPT) - 1:].argmax(-1)[:-1].tolist() == continuation


def test_chunked_prefill_matches_whole_prefill(llama31_dir):
    model, _ = load(llama31_dir)
    reference = hf_logits(llama31_dir, PROMPT)
    stepper = Stepper(model, 7)
    got = torch.cat([stepper.feed(PROMPT[:5]), stepper.feed(PROMPT[5:13]), stepper.feed(PROMPT[13:])])
    assert (got - reference).abs().max().item() <= 1e-4


def test_sharded_checkpoint_has_index(llama31_dir):
    assert (llama31_dir / "model.safetensors.index.json").exists()
    assert len(list(llama31_dir.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_agrees(llama32_dir, dtype):
    model, _ = load(llama32_dir, dtype)
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    logits = Stepper(model, 16).feed(PROMPT)
    reference = hf_logits(llama32_dir, PROMPT)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_missing_shard_and_bad_architecture_are_clear(tmp_path, llama31_dir):
    folder = tmp_path / "m"
    shutil.copytree(llama31_dir, folder)
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MistralForCausalLM"], "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        load(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_cpu_float16_runs_wide_products_in_float32_with_the_same_logits(llama32_dir):
    """torch's CPU float16 matmul is a row-by-row loop (4.7x float32's time at 512 rows): the fast path has a
    CPU float16 model run products of CPU_UPCAST_ROWS rows or more in float32. The logits stay those of the
    float16 model within float16 rounding, and narrow (decode) steps are left exactly as they were."""
    from gllm.model.kernels import PLAIN_KERNELS
    from gllm.runner import RunnerConfig, choose_fast_path
    from gllm.runner.fast_path import CPU_UPCAST_ROWS

    config = RunnerConfig(block_size=16, max_batch_size=4, max_step_tokens=64, max_blocks_per_seq=8)
    model = load(llama32_dir, "float16")[0]
    kernels = choose_fast_path(torch.device("cpu"), model, config).kernels
    assert kernels.upcast_rows == CPU_UPCAST_ROWS
    assert choose_fast_path(torch.device("cpu"), load(llama32_dir)[0], config).kernels.upcast_rows == 0
    prompt = list(range(200, 240))
    plain = Stepper(model, 16).feed(prompt)
    model.use_kernels(kernels)
    wide = Stepper(model, 16).feed(prompt)
    assert torch.allclose(wide, plain, atol=0.02 * plain.abs().max().item()), (wide - plain).abs().max()
    assert not torch.equal(wide, plain)                 # the wide path really ran
    narrow = Stepper(model, 16).feed(prompt[: CPU_UPCAST_ROWS - 1])
    model.use_kernels(PLAIN_KERNELS)
    assert torch.equal(narrow, Stepper(model, 16).feed(prompt[: CPU_UPCAST_ROWS - 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_computes_in_float32(llama32_dir, dtype):
    """torch's CPU SDPA is several times slower in float16/bfloat16 than in float32 (casts included): the CPU
    fast path's plans compute attention in float32 and cast back. A step mixing decodes and a prefill chunk
    gives exactly the float32 attention of the same inputs, rounded once to the model's dtype."""
    from gllm.ops import SdpaPlan, paged_attention
    from gllm.runner import RunnerConfig, choose_fast_path

    config = RunnerConfig(block_size=4, max_batch_size=4, max_step_tokens=64, max_blocks_per_seq=8)
    assert choose_fast_path(torch.device("cpu"), load(llama32_dir)[0], config).float32_attention
    torch.manual_seed(0)
    heads, kv_heads, dim, blocks = 8, 2, 16, 12
    k_cache = torch.randn(blocks, 4, kv_heads, dim).to(dtype)
    v_cache = torch.randn(blocks, 4, kv_heads, dim).to(dtype)
    tables = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    query_lens, context_lens = [1, 1, 5], [10, 6, 14]
    q = torch.randn(sum(query_lens), heads, dim).to(dtype)
    got = paged_attention(q, k_cache, v_cache, tables, torch.tensor(context_lens),
                          SdpaPlan(query_lens, context_lens, float32=True), 0.25)
    want = paged_attention(q.float(), k_cache.float(), v_cache.float(), tables, torch.tensor(context_lens),
                           SdpaPlan(query_lens, context_lens), 0.25).to(dtype)
    native = paged_attention(q, k_cache, v_cache, tables, torch.tensor(context_lens),
                             SdpaPlan(query_lens, context_lens), 0.25)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.allclose(native.float(), want.float(), atol=0.05) and not torch.equal(native, want)


def test_small_cpu_steps_run_on_one_of_the_engines_threads(llama32_dir):
    """With 2 CPU threads, decode steps of up to CPU_ONE_THREAD_TOKENS tokens run on one (waking the other for
    each small operator costs more than it adds), wider steps and prefills on both; with 1 thread nothing
    changes. Read on the engine thread, where the step ran, by a step listener."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.runner.fast_path import CPU_ONE_THREAD_TOKENS

    for threads in (2, 1):
        seen: list[tuple[int, int]] = []
        with LLMEngine(llama32_dir, GeneratorParams(cpu_threads=threads, max_seq_len=128), device="cpu") as eng:
            eng.add_step_listener(lambda info, seen=seen: seen.append((info.num_tokens, torch.get_num_threads())))
            assert ("one thread" in eng.fast_path.describe()) == (threads > 1)
            eng.generate(GenerationRequest(prompt="The smith said", max_new_tokens=4, ignore_eos=True))
            batch = CPU_ONE_THREAD_TOKENS + 1
            eng.generate([GenerationRequest(prompt=f"NPC {i} said", max_new_tokens=4, ignore_eos=True)
                          for i in range(batch)])
        assert all(t == (1 if n <= CPU_ONE_THREAD_TOKENS else threads) for n, t in seen), (threads, seen)
        sizes = {n for n, _ in seen}
        assert {1, batch} <= sizes and any(n > batch for n in sizes)   # decodes alone and batched, prefills

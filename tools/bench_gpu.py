"""GPU benchmarks for gllm (issue 5), printed beside the memory-bandwidth floor and a transformers peer.

Random weights in the exact Llama-3.2-1B / 3B / Llama-3.1-8B shapes (performance does not depend
on weight values), bf16, with the real Llama 3 tokenizer (whose vocabulary these shapes use):
  (a) batch-1 decode: tokens/s and ms/token vs the floor (weight bytes / measured copy bandwidth)
  (b) throughput as nano-vllm measures it: 256 requests, input and output lengths uniform in
      [100, 1024], random token ids, EOS ignored -> output tokens/s
  (c) time to first token for a 1024-token prompt, cold and with a cached 900-token prefix
  (d) transformers `generate` on the same shapes at batch 1 and 128, same process, as the peer

    python tools/bench_gpu.py --tokenizer DIR [--shapes 1b,3b,8b] [--out bench.json] [--skip-peer]
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.engine.loading import LoadedModel, ModelSource  # noqa: E402
from gllm.model import LlamaForCausalLM, ModelConfig, RopeConfig  # noqa: E402
from gllm.tokenizer import Tokenizer  # noqa: E402

LLAMA3_ROPE = dict(theta=500000.0, rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, factor=32.0),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, factor=32.0),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, factor=8.0),
}


def model_config(shape: str) -> ModelConfig:
    spec = dict(SHAPES[shape])
    factor = spec.pop("factor")
    return ModelConfig(vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
                       rope=RopeConfig(factor=factor, **LLAMA3_ROPE), bos_token_id=128000,
                       eos_token_ids=(128001, 128008, 128009), torch_dtype="bfloat16", **spec)


def random_model(cfg: ModelConfig, max_positions: int) -> LlamaForCausalLM:
    from gllm.model.rope import RotaryEmbedding
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    model.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions).to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(25):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * 2 * 1024**3 / statistics.median(times[5:])


def make_engine(cfg: ModelConfig, tokenizer: Tokenizer, **params) -> LLMEngine:
    gen = GeneratorParams(dtype="bfloat16", result_cache_entries=0, **params)
    torch.cuda.empty_cache()
    model = random_model(cfg, gen.max_seq_len)
    loaded = LoadedModel(model, cfg, tokenizer, ModelSource("random", Path("."), "random"), 0.0)
    return LLMEngine(loaded, gen, device="cuda")


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 120000) for _ in range(n)]


def bench_decode(engine: LLMEngine, rng: random.Random, new_tokens: int = 256, repeats: int = 5) -> float:
    """Median ms per decoded token at batch 1 (excluding the first token)."""
    per_token = []
    for i in range(repeats + 1):
        r = engine.generate([GenerationRequest(prompt_token_ids=random_ids(rng, 128), max_new_tokens=new_tokens,
                                               temperature=0, ignore_eos=True)])[0]
        if i:  # the first run warms up
            per_token.append((r.timings.total_ms - r.timings.ttft_ms) / (new_tokens - 1))
    return statistics.median(per_token)


def bench_batch_decode(engine: LLMEngine, rng: random.Random, batch: int = 16, new_tokens: int = 128,
                       repeats: int = 3) -> float:
    """Median ms per decode step with `batch` requests decoding together (a game's dozen or so NPCs; their
    prompts prefill in one step, so they decode side by side from their first tokens to their last)."""
    per_step = []
    for i in range(repeats + 1):
        reqs = [GenerationRequest(prompt_token_ids=random_ids(rng, 128), max_new_tokens=new_tokens, temperature=0,
                                  ignore_eos=True) for _ in range(batch)]
        results = engine.generate(reqs)
        if i:   # the first run warms up
            per_step += [(r.timings.total_ms - r.timings.ttft_ms) / (new_tokens - 1) for r in results]
    return statistics.median(per_step)


def bench_throughput(engine: LLMEngine, rng: random.Random, num_requests: int = 256) -> dict:
    reqs = [GenerationRequest(prompt_token_ids=random_ids(rng, rng.randint(100, 1024)),
                              max_new_tokens=rng.randint(100, 1024), temperature=0, ignore_eos=True)
            for _ in range(num_requests)]
    # Warm-up with the same mix, shorter (Triton compiles each kernel variant once per machine — prefill key
    # splits, batch shapes — keep that out of the timing).
    engine.generate([GenerationRequest(prompt_token_ids=random_ids(rng, rng.randint(100, 1024)),
                                       max_new_tokens=rng.randint(1, 48), ignore_eos=True) for _ in range(num_requests)])
    start = time.perf_counter()
    results = engine.generate(reqs)
    seconds = time.perf_counter() - start
    out_tokens = sum(len(r.tokens) for r in results)
    return {"output_tokens": out_tokens, "seconds": seconds, "tokens_per_s": out_tokens / seconds,
            "preemptions": sum(r.num_preemptions for r in results)}


def bench_ttft(engine: LLMEngine, rng: random.Random, repeats: int = 7) -> dict:
    cold, cached, queued = [], [], []
    for _ in range(repeats):
        prefix = random_ids(rng, 900)
        first = engine.generate([GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)])
        cold.append(first[0].timings.ttft_ms)
        again = engine.generate([GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)])
        assert again[0].usage.cached_tokens >= 880
        cached.append(again[0].timings.ttft_ms)
        queued.append(again[0].timings.queued_ms)
    return {"cold_ms": statistics.median(cold[1:]), "cached_prefix_ms": statistics.median(cached[1:]),
            "cached_prefix_queued_ms": statistics.median(queued[1:])}


def bench_transformers(cfg: ModelConfig, batch: int, new_tokens: int = 64) -> float:
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    with torch.device("cuda"):
        model = HFLlama(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.randint(1000, 120000, (batch, 128), device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return batch * new_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder with the Llama 3 tokenizer.json")
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--out", default="bench_gpu.json")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--no-dependent-launch", action="store_true",
                        help="decode kernels without programmatic dependent launch (to measure what it gives)")
    parser.add_argument("--throughput-runs", type=int, default=1,
                        help="repeat the throughput run (same requests each time) and report the median")
    parser.add_argument("--quantization", choices=("int8", "int4", "q4_k_m"), default=None,
                        help="quantize the random weights on load (the floor then counts the quantized bytes)")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="fixed KV pool in tokens instead of 85%% of the card's memory")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    rng = random.Random(0)
    bandwidth = copy_bandwidth()
    report = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bandwidth / 1e9, "shapes": {}}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    for shape in args.shapes.split(","):
        cfg = model_config(shape)
        weight_bytes = cfg.num_parameters() * 2
        floor_ms = weight_bytes / bandwidth * 1000
        row = {"params": cfg.num_parameters(), "weight_bytes": weight_bytes, "floor_ms": floor_ms}
        torch.cuda.reset_peak_memory_stats()
        budget_mb = 0.85 * torch.cuda.get_device_properties(0).total_memory / 2**20
        sizing = {"kv_cache_tokens": args.kv_tokens} if args.kv_tokens else {"gpu_memory_mb": budget_mb}
        if args.no_dependent_launch:
            sizing["dependent_launch"] = False
        if args.quantization:
            sizing["quantization"] = args.quantization
        engine = make_engine(cfg, tokenizer, max_batch_size=256, max_seq_len=2304, max_step_tokens=4096, **sizing)
        if args.quantization:     # the floor: reading every weight once, at its stored size
            weight_bytes = engine.weight_bytes
            floor_ms = weight_bytes / bandwidth * 1000
            row.update(weight_bytes=weight_bytes, floor_ms=floor_ms, weight_format=engine.weight_format)
            print(f"[{shape}] {engine.weight_format}: {weight_bytes / 2**30:.2f} GiB of weights", flush=True)
        row["gpu_memory_budget_GiB"] = budget_mb / 1024
        row["kv_pool_tokens"] = engine.block_manager.num_blocks * engine.gen_params.block_size
        ms = bench_decode(engine, rng)
        row.update(decode_ms_per_token=ms, decode_tokens_per_s=1000 / ms, floor_fraction=floor_ms / ms)
        print(f"[{shape}] batch-1 decode {ms:.3f} ms/token = {1000 / ms:.0f} tok/s; floor {floor_ms:.3f} ms "
              f"({1000 / floor_ms:.0f} tok/s): {100 * floor_ms / ms:.0f}% of the floor", flush=True)
        ms16 = bench_batch_decode(engine, rng)
        row.update(batch16_step_ms=ms16, batch16_tokens_per_s=16000 / ms16)
        print(f"[{shape}] batch-16 decode {ms16:.3f} ms/step = {16000 / ms16:.0f} tok/s", flush=True)
        row["ttft"] = bench_ttft(engine, rng)
        print(f"[{shape}] TTFT 1024 tokens: cold {row['ttft']['cold_ms']:.2f} ms, "
              f"900 cached {row['ttft']['cached_prefix_ms']:.2f} ms (of which queued "
              f"{row['ttft']['cached_prefix_queued_ms']:.2f})", flush=True)
        if not args.skip_throughput:
            seed = rng.random()
            runs = [bench_throughput(engine, random.Random(seed)) for _ in range(max(1, args.throughput_runs))]
            row["throughput"] = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            row["throughput_runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
            print(f"[{shape}] throughput 256 req: {row['throughput']['tokens_per_s']:.0f} output tok/s "
                  f"({row['throughput']['seconds']:.1f} s, {row['throughput']['preemptions']} preemptions)"
                  + (f"; median of {len(runs)}: {', '.join(f'{r:.0f}' for r in row['throughput_runs_tokens_per_s'])}"
                     if len(runs) > 1 else ""), flush=True)
        row["peak_vram_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        engine.close()
        del engine
        gc.collect()   # an engine caught in a reference cycle would keep its KV pool until a later collection
        torch.cuda.empty_cache()
        if not args.skip_peer:
            row["transformers_b1_tokens_per_s"] = bench_transformers(cfg, 1)
            row["transformers_b128_tokens_per_s"] = bench_transformers(cfg, 128)
            print(f"[{shape}] transformers generate: batch 1 {row['transformers_b1_tokens_per_s']:.0f} tok/s, "
                  f"batch 128 {row['transformers_b128_tokens_per_s']:.0f} tok/s", flush=True)
        report["shapes"][shape] = row
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("\nshape | decode tok/s | ms/tok | floor ms | % floor | TTFT cold/cached ms | thrpt tok/s | HF b1 | HF b128 | peak GiB")
    for shape, r in report["shapes"].items():
        print(f"{shape} | {r['decode_tokens_per_s']:.0f} | {r['decode_ms_per_token']:.3f} | {r['floor_ms']:.3f} | "
              f"{100 * r['floor_fraction']:.0f}% | {r['ttft']['cold_ms']:.1f}/{r['ttft']['cached_prefix_ms']:.1f} | "
              f"{r.get('throughput', {}).get('tokens_per_s', 0):.0f} | {r.get('transformers_b1_tokens_per_s', 0):.0f} | "
              f"{r.get('transformers_b128_tokens_per_s', 0):.0f} | {r['peak_vram_GiB']:.1f} of "
              f"{r['gpu_memory_budget_GiB']:.1f}")


if __name__ == "__main__":
    main()

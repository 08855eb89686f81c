"""CPU benchmark on the default model (SmolLM2-135M-Instruct), gllm against transformers in the same run.

Both load the same GGUF (transformers dequantizes it itself) and run on the same threads, greedy, EOS
ignored; transformers in float32, gllm in `--dtype` (default auto: what the engine picks for this CPU, printed).
Reports decode tokens/s at batch 1 and aggregate tokens/s for N concurrent NPC requests (transformers: one
padded `generate` batch), as medians and as ratios, and gllm's memory: RSS after its runs, measured before
transformers is loaded into the same process (and the peak so far).

    python tools/bench_cpu.py [--threads 2] [--new-tokens 64] [--batch 3] [--repeats 3] [--dtype auto]
                              [--out bench_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="gllm's dtype (auto, float32, float16, bfloat16)")
    parser.add_argument("--out", default="bench_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.engine.catalog import fetch_known_model

    gguf = fetch_known_model()
    engine = LLMEngine(None, GeneratorParams(result_cache_entries=0, max_batch_size=8, max_seq_len=1024, cpu_threads=args.threads,
                                             dtype=args.dtype), device="cpu")
    dtype = str(engine.dtype).removeprefix("torch.")
    print(f"gllm dtype: {dtype} ({engine.dtype_reason})", flush=True)
    prompts = [engine.tokenizer.encode_chat([{"role": "system", "content": f"You are NPC number {i}."},
                                             {"role": "user", "content": "Tell me about the old mine."}])
               for i in range(args.batch)]
    n = args.new_tokens

    def gllm_run(batch: list[list[int]]) -> float:
        reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in batch]
        start = time.perf_counter()
        results = engine.generate(reqs)
        return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)

    gllm_run(prompts)
    memory = {"gllm_rss_mb": _rss_mb(), "gllm_peak_rss_mb": _peak_rss_mb()}
    print(f"gllm memory: RSS {memory['gllm_rss_mb']:.0f} MB after its runs, peak {memory['gllm_peak_rss_mb']:.0f} MB",
          flush=True)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()

    def hf_run(batch: list[list[int]]) -> float:
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        start = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0)
        return len(batch) * n / (time.perf_counter() - start)

    rows = {}
    for label, batch in (("batch 1", prompts[:1]), (f"batch {args.batch}", prompts)):
        gllm_run(batch), hf_run(batch)  # warm-up
        ours = statistics.median(gllm_run(batch) for _ in range(args.repeats))
        peer = statistics.median(hf_run(batch) for _ in range(args.repeats))
        rows[label] = {"gllm_tok_s": ours, "transformers_tok_s": peer, "ratio": ours / peer}
        print(f"{label}: gllm {ours:.1f} tok/s, transformers {peer:.1f} tok/s, ratio {ours / peer:.2f}x", flush=True)
    engine.close()
    report = {"model": "SmolLM2-135M-Instruct Q4_1 (dequantized)", "gllm_dtype": dtype,
              "transformers_dtype": "float32", "threads": args.threads, "new_tokens": n,
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "rows": rows, **memory}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()

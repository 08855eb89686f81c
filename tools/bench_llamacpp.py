"""gllm against llama.cpp (llama-cpp-python) on the same GGUF, on the CPU: perplexity on the same token ids and
batch-1 greedy decode speed, each with the same thread count.

The text is the start of `pydoc_data.topics` (as tools/bench_perplexity.py), tokenized once by gllm's tokenizer
and fed to both as token ids, scored in the same non-overlapping windows (each a fresh sequence). Decode: both
prefill the same 64-token prompt and generate `--new-tokens` greedily (llama.cpp's timing is the time of its
`eval` calls; gllm's the engine's decode steps). llama-cpp-python builds llama.cpp from its sdist; it is a tool
dependency only:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --target /tmp/llamacpp llama-cpp-python
    PYTHONPATH=/tmp/llamacpp python tools/bench_llamacpp.py [--gguf FILE] [--threads 2] [--tokens 4096]
        [--window 1024] [--new-tokens 64] [--quantization auto|float|int4] [--out bench_llamacpp.json]

Then each side alone in a fresh process (only what it imports to run: torch and gllm, or llama_cpp): load,
with the same 1,024-token KV budget, prefill `--prefill-tokens` of the same ids (TTFT and prefill tok/s, a fresh process's first), greedy decode of
`--new-tokens` after a 64-token prompt (median step), and the process's peak RSS. In the shared process each
side's threads can still be winding down while the other computes; the alone figures are the fair ones.

An AVX2 CPU on an AVX-512 machine: llama.cpp built for AVX2 only, torch's kernels held to AVX2 and gllm's
activations in float16 (what `dtype="auto"` picks on an AVX2 CPU):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
        pip install --no-binary llama-cpp-python --target /tmp/llamacpp_avx2 llama-cpp-python
    ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=/tmp/llamacpp_avx2 python tools/bench_llamacpp.py --dtype float16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_perplexity import window_nll  # noqa: E402


def llamacpp_nll(llm, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes, one fresh llama.cpp sequence."""
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    logz = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    return float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum()), len(ids) - 1


# Each side in a fresh process: prefill the ids, decode greedily, report the peak RSS of that process (VmHWM;
# ru_maxrss would carry over the parent's high-water mark through fork and exec).
PEAK = """
def PEAK():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
ALONE = {
    "gllm": """
import json, statistics, sys, time
from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
gguf, threads, quant, n_new, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, int(sys.argv[4]), json.loads(sys.stdin.read())
dtype = sys.argv[5]
t0 = time.perf_counter()
engine = LLMEngine(gguf, GeneratorParams(max_seq_len=1024, kv_cache_tokens=1024, cpu_threads=threads,
                                         quantization=quant, result_cache_entries=0, enable_prefix_caching=False,
                                         dtype=dtype),
                   device="cpu")
load = time.perf_counter() - t0
t0 = time.perf_counter()
engine.generate(GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, temperature=0))
ttft = time.perf_counter() - t0
steps = []
engine.add_step_listener(lambda info: steps.append(info.seconds) if info.num_tokens == 1 else None)
engine.generate(GenerationRequest(prompt_token_ids=ids[:64], max_new_tokens=n_new + 1, temperature=0, ignore_eos=True))
engine.close()
print(json.dumps({"load_s": load, "ttft_s": ttft, "decode_tok_s": 1 / statistics.median(steps), "peak_rss_mb": PEAK()}))
""",
    "llama.cpp": """
import json, statistics, sys, time
import numpy as np
import llama_cpp
gguf, threads, quant, n_new, ids = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), json.loads(sys.stdin.read())
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=gguf, n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                      verbose=False)
load = time.perf_counter() - t0
t0 = time.perf_counter()
llm.eval(ids)
ttft = time.perf_counter() - t0
llm.reset()
llm.eval(ids[:64])
token, steps = int(np.argmax(llm.scores[63])), []
for _ in range(n_new):
    t0 = time.perf_counter()
    llm.eval([token])
    steps.append(time.perf_counter() - t0)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
print(json.dumps({"load_s": load, "ttft_s": ttft, "decode_tok_s": 1 / statistics.median(steps), "peak_rss_mb": PEAK()}))
""",
}


def alone(side: str, gguf: Path, threads: int, quantization: str | None, new_tokens: int, ids: list[int],
          dtype: str = "auto") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", PEAK + ALONE[side], str(gguf), str(threads), quantization or "",
                          str(new_tokens), dtype],
                         input=json.dumps(ids), capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="default: the default model's GGUF (gllm fetch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default=None, help="gllm's GeneratorParams.quantization (default: its own)")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="auto", help="gllm's activations (auto: what this CPU gets; float16: "
                                                        "what an AVX2 CPU gets, with ATEN_CPU_CAPABILITY=avx2)")
    parser.add_argument("--out", default="bench_llamacpp.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pydoc_data.topics import topics

    import llama_cpp

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.engine.catalog import DEFAULT_MODEL, fetch_known_model

    gguf = Path(args.gguf) if args.gguf else fetch_known_model(DEFAULT_MODEL, quiet=True)
    engine = LLMEngine(str(gguf), GeneratorParams(max_seq_len=max(args.window, 512), cpu_threads=args.threads,
                                                  quantization=args.quantization, result_cache_entries=0,
                                                  dtype=args.dtype),
                       device="cpu")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(args.window, 512), n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, logits_all=True, verbose=False)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = engine.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
    windows = [ids[w:w + args.window] for w in range(0, len(ids), args.window) if len(ids[w:w + args.window]) > 1]

    report: dict = {"gguf": str(gguf), "python": platform.python_version(), "threads": args.threads,
                    "tokens": len(ids), "window": args.window, "gllm_weights": engine.weight_format,
                    "llama_cpp_python": llama_cpp.__version__}
    for name, score in (("gllm", lambda w: window_nll(engine, w)), ("llama.cpp", lambda w: llamacpp_nll(llm, w))):
        started = time.perf_counter()
        with torch.inference_mode():
            parts = [score(w) for w in windows]
        nll, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        report[name] = {"perplexity": math.exp(nll / count), "tokens_scored": count,
                        "score_s": time.perf_counter() - started}
        print(f"{name}: perplexity {report[name]['perplexity']:.4f} over {count} tokens "
              f"({report[name]['score_s']:.1f} s)", flush=True)
    report["perplexity_ratio"] = report["gllm"]["perplexity"] / report["llama.cpp"]["perplexity"]

    # Decode: the same prompt ids, greedy, batch 1.
    llm_decode = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=args.threads,
                                 n_threads_batch=args.threads, verbose=False)
    prompt = ids[:64]
    gllm_rates, llama_rates = [], []
    for _ in range(args.repeats):
        steps: list[float] = []

        def on_step(info, steps=steps) -> None:
            if info.num_tokens == 1:   # decode steps only (the prompt is the first)
                steps.append(info.seconds)

        engine.add_step_listener(on_step)
        engine.generate(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=args.new_tokens + 1,
                                          temperature=0, ignore_eos=True))
        engine.remove_step_listener(on_step)
        gllm_rates.append(len(steps) / sum(steps))
        llm_decode.reset()
        llm_decode.eval(prompt)
        token = int(np.argmax(llm_decode.scores[len(prompt) - 1]))
        started = time.perf_counter()
        for _ in range(args.new_tokens):
            llm_decode.eval([token])
            token = int(np.argmax(llm_decode.scores[llm_decode.n_tokens - 1]))
        llama_rates.append(args.new_tokens / (time.perf_counter() - started))
    report["decode_tok_s"] = {"gllm": statistics.median(gllm_rates), "llama.cpp": statistics.median(llama_rates),
                              "gllm_runs": gllm_rates, "llama_cpp_runs": llama_rates}
    print(f"batch-1 decode ({args.threads} threads, {args.new_tokens} tokens, median of {args.repeats}): gllm "
          f"{statistics.median(gllm_rates):.1f} tok/s ({engine.weight_format}), llama.cpp "
          f"{statistics.median(llama_rates):.1f} tok/s; perplexity ratio gllm / llama.cpp "
          f"{report['perplexity_ratio']:.4f}")
    engine.close()
    prefill_ids = ids[: args.prefill_tokens]
    for side in ("gllm", "llama.cpp"):
        report[side]["alone"] = r = alone(side, gguf, args.threads, args.quantization, args.new_tokens, prefill_ids, args.dtype)
        print(f"{side} alone: load {r['load_s']:.2f} s, TTFT of {len(prefill_ids)} tokens {r['ttft_s'] * 1000:.0f} ms "
              f"({len(prefill_ids) / r['ttft_s']:.0f} tok/s prefill), decode {r['decode_tok_s']:.1f} tok/s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    a, b = report["gllm"]["alone"], report["llama.cpp"]["alone"]
    report["alone_ratios"] = {"decode": a["decode_tok_s"] / b["decode_tok_s"], "prefill": b["ttft_s"] / a["ttft_s"],
                              "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"]}
    print("alone, gllm / llama.cpp: decode {decode:.2f}x, prefill {prefill:.2f}x, peak RSS {peak_rss:.2f}x"
          .format(**report["alone_ratios"]))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

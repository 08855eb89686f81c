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
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="default: the default model's GGUF (gllm fetch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantization", default=None, help="gllm's GeneratorParams.quantization (default: its own)")
    parser.add_argument("--out", default="bench_llamacpp.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pydoc_data.topics import topics

    import llama_cpp

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.engine.catalog import DEFAULT_MODEL, fetch_known_model

    gguf = Path(args.gguf) if args.gguf else fetch_known_model(DEFAULT_MODEL, quiet=True)
    engine = LLMEngine(str(gguf), GeneratorParams(max_seq_len=max(args.window, 512), cpu_threads=args.threads,
                                                  quantization=args.quantization, result_cache_entries=0),
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
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Quantized weights on the CPU: gllm's float projections against quantized ones, same model, same run.

Loads the default model (or `--model`) once per weight format (`--formats`, the first one the baseline):
`float` (every weight dequantized to the engine's dtype as it picks it), `file` (a GGUF's own blocks kept as
they are: the engine's default for a GGUF), `int8` and `int4` (`--group-size`; quantization on load) — and
times greedy decoding, EOS ignored, at batch 1 and batch `--batch`, the formats interleaved repeat by repeat
so that a busy machine slows them alike. Prints medians, ratios against the baseline, the weights' bytes,
and how many of the greedy tokens each format shares with the baseline (prefix agreement per prompt).

    python tools/bench_quant.py [--model NAME_OR_PATH] [--formats float,file,int8,int4] [--threads 2]
                                [--new-tokens 64] [--batch 3] [--repeats 3] [--group-size 32]
                                [--out bench_quant.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--formats", default="float,file,int8,int4")
    parser.add_argument("--out", default="bench_quant.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

    formats = tuple(args.formats.split(","))
    quantization = {"file": None}         # the engine's default: a GGUF's blocks as they are
    engines = {q: LLMEngine(args.model, GeneratorParams(result_cache_entries=0, max_batch_size=8, max_seq_len=1024,
                                                        cpu_threads=args.threads,
                                                        quantization=quantization.get(q, q),
                                                        quant_group_size=args.group_size),
                            device="cpu") for q in formats}
    first = engines[formats[0]]
    for q, e in engines.items():
        print(f"{q}: {e.weight_format}, loaded in {e.load_seconds:.1f} s", flush=True)
    print(f"model {first.model_name} ({first.dtype_reason})", flush=True)
    prompts = [first.tokenizer.encode_chat([{"role": "system", "content": f"You are NPC number {i}."},
                                            {"role": "user", "content": "Tell me about the old mine."}])
               for i in range(args.batch)]
    n = args.new_tokens

    def run(q: str, batch: list[list[int]]) -> tuple[float, list[list[int]]]:
        reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=n, temperature=0, ignore_eos=True) for p in batch]
        start = time.perf_counter()
        results = engines[q].generate(reqs)
        return sum(len(r.tokens) for r in results) / (time.perf_counter() - start), [r.tokens for r in results]

    rows: dict[str, dict] = {}
    texts = {q: run(q, prompts)[1] for q in formats}          # warm-up, and the greedy tokens
    for label, batch in (("batch 1", prompts[:1]), (f"batch {args.batch}", prompts)):
        times: dict[str, list[float]] = {q: [] for q in formats}
        for _ in range(args.repeats):
            for q in formats:
                times[q].append(run(q, batch)[0])
        base = statistics.median(times[formats[0]])
        rows[label] = {q: {"tok_s": statistics.median(times[q]),
                           f"ratio_vs_{formats[0]}": statistics.median(times[q]) / base} for q in formats}
        print(f"{label}: " + ", ".join(f"{q} {statistics.median(times[q]):.1f} tok/s "
                                       f"({statistics.median(times[q]) / base:.2f}x)" for q in formats), flush=True)
    agreement = {}
    for q in formats[1:]:
        shared = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                  for x, y in zip(texts[formats[0]], texts[q])]
        agreement[q] = shared
        print(f"{q}: greedy tokens shared with {formats[0]} before the first difference, per prompt: {shared} of {n}")
    weights = {q: {"format": e.weight_format, "bytes": e.weight_bytes, "load_s": e.load_seconds}
               for q, e in engines.items()}
    for key, w in weights.items():
        print(f"{key}: {w['bytes'] / 2**20:.1f} MiB of weights ({w['format']})")
    for e in engines.values():
        e.close()
    with open(args.out, "w") as f:
        json.dump({"model": first.model_name, "threads": args.threads, "new_tokens": n, "group_size": args.group_size,
                   "torch": torch.__version__, "rows": rows, "weights": weights, "greedy_agreement": agreement},
                  f, indent=1)


if __name__ == "__main__":
    main()

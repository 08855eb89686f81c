"""Perplexity of gllm's weight formats (float, a GGUF's own blocks, int8, int4) on a fixed English text that ships with Python.

The text is the start of `pydoc_data.topics` (the help topics of this Python, so the figure depends on the
Python version: it is printed), tokenized by the model's tokenizer without special tokens, cut to `--tokens`
and scored in windows of `--window` tokens (each window a fresh sequence, every position after its first
scored), through each engine's own model and a paged KV cache, in the engine's dtype.

    python tools/bench_perplexity.py [--model NAME_OR_PATH] [--tokens 4096] [--window 1024] [--threads 2]
                                     [--formats float,file,int8,int4] [--out bench_perplexity.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch


def window_nll(engine, ids: list[int], chunk: int = 256) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given what precedes, one sequence through a paged cache."""
    from gllm.kv import BlockManager, BlockTable, KVCache, slots_of
    from gllm.model import ForwardBatch
    from gllm.ops import SdpaPlan

    block = 16
    blocks = BlockManager(len(ids) // block + 2, block, enable_prefix_caching=False)
    cache = KVCache(engine.model_config, blocks.num_blocks, block, engine.dtype, "cpu")
    table = BlockTable()
    total, start = 0.0, 0
    while start < len(ids):
        piece = ids[start:start + chunk]
        end = start + len(piece)
        assert blocks.grow(table, end)
        batch = ForwardBatch(input_ids=torch.tensor(piece), positions=torch.arange(start, end),
                             slot_mapping=torch.tensor(slots_of(table.block_ids, start, end, block)),
                             context_lens=torch.tensor([end]), block_tables=torch.tensor([table.block_ids]),
                             logits_indices=torch.arange(len(piece)), attention=SdpaPlan([len(piece)], [end]))
        logprobs = torch.log_softmax(engine.model(batch, cache.layers), dim=-1)
        targets = ids[start + 1:end + 1]
        total -= float(logprobs[torch.arange(len(targets)), torch.tensor(targets)].sum())
        start = end
    return total, len(ids) - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="float,file,int8,int4")
    parser.add_argument("--out", default="bench_perplexity.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pydoc_data.topics import topics

    from gllm.engine import GeneratorParams, LLMEngine

    text = "\n\n".join(topics[k] for k in sorted(topics))
    results = {}
    for fmt in args.formats.split(","):
        quantization = None if fmt == "file" else fmt      # file: a GGUF's own blocks, the engine's default
        engine = LLMEngine(args.model, GeneratorParams(max_seq_len=max(args.window, 256), cpu_threads=args.threads,
                                                       quantization=quantization), device="cpu")
        ids = engine.tokenizer.encode(text, add_special_tokens=False)[: args.tokens]
        started = time.perf_counter()
        nll = count = 0
        with torch.inference_mode():
            for w in range(0, len(ids), args.window):
                window = ids[w:w + args.window]
                if len(window) > 1:
                    s, n = window_nll(engine, window)
                    nll, count = nll + s, count + n
        ppl = math.exp(nll / count)
        results[fmt] = {"perplexity": ppl, "tokens_scored": count, "weights": engine.weight_format,
                        "weight_bytes": engine.weight_bytes, "seconds": time.perf_counter() - started}
        print(f"{fmt}: perplexity {ppl:.3f} over {count} tokens ({engine.weight_format}; "
              f"{engine.weight_bytes / 2**20:.0f} MiB; {time.perf_counter() - started:.0f} s)", flush=True)
        engine.close()
    if "float" in results:
        for r in results.values():
            r["ratio_vs_float"] = r["perplexity"] / results["float"]["perplexity"]
    with open(args.out, "w") as f:
        json.dump({"model": args.model or "default", "python": platform.python_version(), "tokens": args.tokens,
                   "window": args.window, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

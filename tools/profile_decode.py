"""Where a decode step's GPU time goes (a development tool, not a benchmark).

    python tools/profile_decode.py --tokenizer DIR [--shape 1b] [--quantization int4] [--steps 32] [--rows 1]
        [--out trace.json]

Prints the engine's ms a step beside one graph replay alone, then runs a greedy generation of `--rows`
requests decoding together (1: the `bench_gpu.py` decode case; 8-16: a game's NPCs, whose graph took
1.7x the one-row graph on an H200 in session 28) under the torch profiler and reads the kernels back
from its trace (CUDA-graph replays included): per kernel name the count per step and mean
duration, the step's span and busy time, and one step's timeline with what each kernel or copy
adds to the step's end.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import make_engine, model_config, random_ids  # noqa: E402

from gllm.engine import GenerationRequest  # noqa: E402
from gllm.tokenizer import Tokenizer  # noqa: E402


def time_replays(graph: torch.cuda.CUDAGraph, n: int = 200) -> float:
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernels_of_trace(path: str) -> list[tuple[float, float, str]]:
    """(start µs, duration µs, name) of every GPU kernel in a chrome trace, by start time."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    out = [(float(e["ts"]), float(e["dur"]), e["name"]) for e in events
           if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(out)


def split_steps(kernels: list[tuple[float, float, str]], step_end: str) -> list[list[tuple[float, float, str]]]:
    """Kernels grouped into steps, each ending with a kernel whose name contains `step_end` (the sampler's
    last kernel; with dependent launch the kernels of a step overlap, so idle gaps cannot tell steps apart)."""
    steps: list[list[tuple[float, float, str]]] = [[]]
    for k in kernels:
        steps[-1].append(k)
        if step_end in k[2]:
            steps.append([])
    return [s for s in steps if s]


def step_stats(step: list[tuple[float, float, str]]) -> dict:
    span = step[-1][0] + step[-1][1] - step[0][0]
    busy = sum(d for _, d, _ in step)
    return {"kernels": len(step), "span_us": span, "busy_us": busy, "gaps_us": span - busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--step-end", default="_row_max_kernel",
                        help="the name (part) of the kernel that ends a step: the greedy sampler's last")
    parser.add_argument("--out", help="also keep the chrome trace here")
    parser.add_argument("--no-dependent-launch", action="store_true")
    parser.add_argument("--times-only", action="store_true", help="stop after the engine and replay times")
    parser.add_argument("--rows", type=int, default=1, help="requests decoding together (one token each a step)")
    parser.add_argument("--quantization", choices=("int8", "int4", "q4_k_m"), default=None, help="weights quantized on load")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    engine = make_engine(model_config(args.shape), tokenizer, max_batch_size=max(8, args.rows), max_seq_len=1024,
                         kv_cache_tokens=max(8192, 512 * args.rows),
                         dependent_launch=False if args.no_dependent_launch else None, quantization=args.quantization)
    rng = random.Random(0)

    def generate(tokens: int) -> None:
        engine.generate([GenerationRequest(prompt_token_ids=random_ids(rng, 128), max_new_tokens=tokens,
                                           temperature=0, ignore_eos=True) for _ in range(args.rows)])

    generate(64)   # warm-up
    start = time.perf_counter()
    generate(257)
    engine_ms = (time.perf_counter() - start) * 1000
    decoder = engine.runner.graph_decoder
    # The graph of this many rows still holds the last step's inputs (the requests' blocks): replaying it
    # writes their K/V again, which nothing reads any more.
    size = decoder.padded_size(args.rows)
    print(f"engine: {engine_ms / 257:.3f} ms a step over 257 steps of {args.rows} rows (prefill included); "
          f"graph replay alone ({size} rows) {time_replays(decoder.graphs[size]):.3f} ms")
    if args.times_only:
        engine.close()
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(args.steps)
    trace = args.out or tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(trace)
    engine.close()

    kernels = kernels_of_trace(trace)
    steps = split_steps(kernels, args.step_end)
    # Decode steps are the common kernel count; the prefill step differs.
    common = statistics.mode(len(s) for s in steps)
    decode = [s for s in steps if len(s) == common][1:-1]
    stats = [step_stats(s) for s in decode]
    print(f"{len(steps)} steps (ending at {args.step_end}); {len(decode)} decode steps of {common} kernels:")
    for key in ("span_us", "busy_us", "gaps_us"):
        print(f"  median {key}: {statistics.median(s[key] for s in stats):.1f}")
    window = kernels[-1][0] + kernels[-1][1] - kernels[0][0]
    idle = sum(max(0.0, b[0] - (a[0] + a[1])) for a, b in zip(kernels, kernels[1:]))
    print(f"whole window ({args.steps} steps, prefill included): {window / args.steps:.1f} us a step, GPU idle "
          f"{idle / args.steps:.1f} us a step")
    per_name: dict[str, list[float]] = defaultdict(list)
    for _, d, name in kernels:
        per_name[name].append(d)
    print("\na step over the window: count, mean us, total us, kernel")
    rows = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in rows[:30]:
        print(f"  {len(durs) / args.steps:5.1f} {statistics.mean(durs):8.2f} {sum(durs) / args.steps:8.1f}  "
              f"{name[:100]}")
    middle = decode[len(decode) // 2]
    # With dependent launch a kernel starts before the one before it ends: what it adds to the step is
    # how much later it ends than everything before it.
    print("\none step: start us, duration us, end minus the latest end before it us, kernel or copy")
    latest = middle[0][0]
    for ts, d, name in middle:
        print(f"  {ts - middle[0][0]:8.1f} {d:7.2f} {ts + d - latest:6.2f}  {name[:90]}")
        latest = max(latest, ts + d)


if __name__ == "__main__":
    main()

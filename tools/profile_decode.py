"""Where does a batch-1 decode step's time go on the GPU? (a development tool, not a benchmark)

Prints: graph replay time alone, the engine's whole step time, the kernel table of one replay,
and the replay time of the same forward compiled with torch.compile (fused elementwise ops).

    python tools/profile_decode.py --tokenizer DIR [--shape 1b] [--batch 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import make_engine, model_config  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    engine = make_engine(model_config(args.shape), Tokenizer.from_dir(args.tokenizer), max_batch_size=64,
                         max_seq_len=2048, max_step_tokens=2048)
    steps = []
    engine.add_step_listener(lambda info: steps.append(info))
    reqs = [GenerationRequest(prompt_token_ids=list(range(1000, 1128)), max_new_tokens=200, temperature=0,
                              ignore_eos=True) for _ in range(args.batch)]
    engine.generate(reqs)
    steps.clear()
    r = engine.generate(reqs)[0]
    decode_steps = [s.seconds * 1000 for s in steps if s.num_decodes == s.num_seqs]
    decoder = engine.runner.graph_decoder
    b = decoder.padded_size(args.batch)
    replay_ms = time_replays(decoder.graphs[b])
    print(f"engine: {(r.timings.total_ms - r.timings.ttft_ms) / 199:.3f} ms/token; step wall median "
          f"{statistics.median(decode_steps):.3f} ms; graph replay alone {replay_ms:.3f} ms (batch {b})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            decoder.graphs[b].replay()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60)
    print(table)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"kernels per replay: {sum(e.count for e in events) / 5:.0f}")
    prompt = list(range(2000, 3024))
    for _ in range(3):
        engine.generate([GenerationRequest(prompt_token_ids=prompt, max_new_tokens=1, temperature=0)])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        r = engine.generate([GenerationRequest(prompt_token_ids=prompt, max_new_tokens=1, temperature=0)])[0]
    print(f"prefill 1024 tokens: ttft {r.timings.ttft_ms:.2f} ms (queued {r.timings.queued_ms:.2f} ms)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=50))
    if args.compile:
        model = engine.model
        compiled = torch.compile(model.forward, dynamic=False, fullgraph=False)
        batch = decoder._batch(b)
        for _ in range(3):
            compiled(batch, engine.kv_cache.layers)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, stream=stream):
            compiled(batch, engine.kv_cache.layers)
        print(f"torch.compile'd forward in a graph: {time_replays(graph):.3f} ms per replay (eager graph "
              f"{replay_ms:.3f})")
    engine.close()


if __name__ == "__main__":
    main()

"""Profile the engine's own loop (host side) on the GPU: cProfile of steps run in the main thread.

    python tools/profile_engine.py --tokenizer DIR [--requests 64] [--shape 1b]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import make_engine, model_config, random_ids  # noqa: E402

from gllm.engine import GenerationRequest  # noqa: E402
from gllm.tokenizer import Tokenizer  # noqa: E402


class NullSink:
    def put(self, event) -> None:
        pass


def drive(engine, reqs, profile: bool, label: str) -> None:
    for r in reqs:
        engine._submit(r, NullSink())
    engine._drain_inbox(False)
    times = []
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    while engine.scheduler.has_work or engine._inflight is not None:
        t = time.perf_counter()
        engine._step()
        times.append((time.perf_counter() - t) * 1000)
    engine._flush_deferred()
    torch.cuda.synchronize()
    if prof:
        prof.disable()
    print(f"{label}: {len(times)} steps, total {sum(times):.0f} ms, median step {statistics.median(times):.2f} ms, "
          f"max {max(times):.1f} ms")
    if prof:
        pstats.Stats(prof).sort_stats("cumtime").print_stats(28)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def timeline_of_cached_prefill(engine, rng) -> None:
    """When, within one cached-prefix prefill step, the host calls into CUDA and the GPU runs (ms from step start)."""
    prefix = random_ids(rng, 900)
    drive(engine, [GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)], False,
          "prefix")
    for r in [GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)]:
        engine._submit(r, NullSink())
    engine._drain_inbox(False)
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        with torch.profiler.record_function("step"):
            while engine.scheduler.has_work or engine._inflight is not None:
                engine._step()
        torch.cuda.synchronize()
    events = prof.events()
    step = next(e for e in events if e.name == "step")
    t0 = step.time_range.start
    gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"timeline: step {(step.time_range.end - t0) / 1000:.3f} ms; GPU busy from "
          f"{(min(e.time_range.start for e in gpu) - t0) / 1000:.3f} to {(max(e.time_range.end for e in gpu) - t0) / 1000:.3f} ms, "
          f"kernel time {sum(e.time_range.elapsed_us() for e in gpu) / 1000:.3f} ms")
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda") and \
                e.time_range.elapsed_us() > 20:
            print(f"  host {e.name:28s} {(e.time_range.start - t0) / 1000:7.3f} .. {(e.time_range.end - t0) / 1000:7.3f} ms")
    kernels: dict[str, float] = {}
    for e in gpu:
        kernels[e.name[:50]] = kernels.get(e.name[:50], 0.0) + e.time_range.elapsed_us()
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  gpu {name:50s} {us / 1000:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--only-ttft", action="store_true", help="only the prefill / cached-prefix profiles")
    args = parser.parse_args()
    engine = make_engine(model_config(args.shape), Tokenizer.from_dir(args.tokenizer), max_batch_size=256,
                         max_seq_len=2304, max_step_tokens=4096, kv_cache_tokens=256 * 2304)
    engine._inbox.put(("close", None))
    engine._thread.join()          # run the loop here, in the profiled thread
    engine._closed = False
    rng = random.Random(0)
    prompt = random_ids(rng, 1024)
    drive(engine, [GenerationRequest(prompt_token_ids=prompt, max_new_tokens=2)], False, "warm-up")
    drive(engine, [GenerationRequest(prompt_token_ids=random_ids(rng, 1024), max_new_tokens=1)], True, "prefill 1024")
    for profile in (False, False, True):   # a 1024-token prompt whose first 900 tokens are cached
        prefix = random_ids(rng, 900)
        drive(engine, [GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)], False,
              "prefix")
        drive(engine, [GenerationRequest(prompt_token_ids=prefix + random_ids(rng, 124), max_new_tokens=1)], profile,
              "cached prefix 900 + 124")
    timeline_of_cached_prefill(engine, rng)
    if args.only_ttft:
        return
    reqs = [GenerationRequest(prompt_token_ids=random_ids(rng, rng.randint(100, 1024)),
                              max_new_tokens=rng.randint(100, 400), temperature=0, ignore_eos=True)
            for _ in range(args.requests)]
    drive(engine, reqs, True, f"{args.requests} requests")
    one = [GenerationRequest(prompt_token_ids=random_ids(rng, 200), max_new_tokens=300, temperature=0, ignore_eos=True)]
    drive(engine, one, True, "1 request, 300 tokens")


if __name__ == "__main__":
    main()

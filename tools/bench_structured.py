"""Per-step cost of structured output: decode steps with every row under a 10-field JSON Schema against the
same batch unconstrained, at batch 1 and 16 (prints a table, writes JSON).

What the batch pays per token is the interval between consecutive steps while every row of the full batch
decodes (steps overlap, so a step's own span says less): its median, and its mean (the inverse of the
throughput: the figure the issue's "throughput loss" is about). The grammar-mask time is measured where the
masks are computed (the mask thread, beside the forward). With --phases, the engine thread's parts of a step,
and on CUDA the device's wait at each stream gate and the mask thread's chain, by part.

CPU (default model):
    python tools/bench_structured.py
GPU (random weights in the Llama-3.2-1B shape: the forward's speed does not depend on the weights, the masks'
does: random weights write each bounded string up to its maxLength, where a mask costs most):
    python tools/make_random_model.py --shape 1b --tokenizer ~/.cache/gllm/test-fixtures/tokenizer-llama3 \\
        --out /tmp/llama-1b
    python tools/bench_structured.py --model /tmp/llama-1b --device cuda --tokens 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine  # noqa: E402
from gllm.sampling.grammar import unpack_masks  # noqa: E402

# Ten fields, as an NPC's full decision might carry: enums, bounded numbers, booleans, short strings, an array.
SCHEMA = {
    "type": "object",
    "properties": {
        "action": {"enum": ["open_gate", "close_gate", "refuse", "call_captain", "attack", "flee", "trade", "talk"]},
        "target": {"enum": ["player", "captain", "north_gate", "south_gate", "market", "none"]},
        "say": {"type": "string", "maxLength": 80},
        "mood": {"enum": ["calm", "angry", "afraid", "amused"]},
        "trust": {"type": "integer", "minimum": 0, "maximum": 100},
        "price": {"type": "integer", "minimum": 0, "maximum": 10000},
        "urgent": {"type": "boolean"},
        "remember": {"type": "string", "maxLength": 60},
        "items": {"type": "array", "items": {"enum": ["sword", "shield", "torch", "letter"]}, "maxItems": 3},
        "next_line": {"type": "string", "maxLength": 80},
    },
    "required": ["action", "target", "say", "mood", "trust", "price", "urgent", "remember", "items", "next_line"],
    "additionalProperties": False,
}


# The engine thread's parts of a step, timed with --phases (_collect includes waiting for the step's tokens).
PHASES = ("_launch_ahead", "_flush_deferred", "_collect", "_await_masks", "_accept_token", "_sample_ahead")


def _timed(fn, name: str, total: dict[str, float], trace: list | None = None):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            total[name] = total.get(name, 0.0) + end - t
            if trace is not None:
                trace.append((name, t, end))
    return wrapper


def run(engine: LLMEngine, batch: int, tokens: int, constrained: bool, seed: int, phases: bool = False,
        trace: bool = False) -> dict:
    steps: list[float] = []
    mask_s: list[float] = []
    fill = engine.grammars._fill

    fills: list[tuple[float, float]] = []   # (start, end) of each fill on the mask thread

    def timed_fill(*args, **kwargs):    # llguidance's work, on the engine thread or the mask thread
        t = time.perf_counter()
        fill(*args, **kwargs)
        end = time.perf_counter()
        mask_s.append(end - t)
        if threading.current_thread().name.startswith("gllm-masks"):
            fills.append((t, end))

    ends: list[float | None] = []   # when each step was reported (None: not a full-batch decode step)
    reported: list[float] = []      # when each step was reported, every step (the timeline)

    def on_step(info) -> None:
        full = info.num_decodes == batch and info.num_tokens == batch
        if full:
            steps.append(info.seconds)
        reported.append(time.perf_counter())
        ends.append(reported[-1] if full else None)

    engine.grammars._fill = timed_fill
    gate_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []   # around each gated mask copy
    jobs: list[dict[str, float]] = []   # each mask job's moments on the mask thread (perf_counter s)
    after_gate: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []   # gate's copy done -> sampled
    gate, start_masks = engine._mask_gate, engine.grammars.start_masks
    if gate is not None:
        copy_when_open = gate.copy_when_open

        def timed_copy(ticket, host):   # the device's wait at the gate, by CUDA events on the stream
            before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before.record()
            out = copy_when_open(ticket, host)
            after.record()
            gate_events.append((before, after))
            return out

        sampler_launch_gated = engine.sampler.launch

        def launch_recording_sampled(*args, **kwargs):   # the device's work after a gate, to the tokens' copy
            n = len(gate_events)
            pending = sampler_launch_gated(*args, **kwargs)
            if len(gate_events) > n:
                sampled = torch.cuda.Event(enable_timing=True)
                sampled.record()
                after_gate.append((gate_events[-1][1], sampled))
            return pending

        def timed_start(constraints, tokens, then):
            job: dict[str, float] = {}

            job["queued"] = time.perf_counter()

            def timed_tokens():
                job["start"] = time.perf_counter()
                ids = tokens()
                job["tokens"] = time.perf_counter()
                return ids

            def opened():
                then()
                job["open"] = time.perf_counter()
                jobs.append(job)
            return start_masks(constraints, timed_tokens, opened)
        gate.copy_when_open = timed_copy
        engine.grammars.start_masks = timed_start
        engine.sampler.launch = launch_recording_sampled
    phase_s: dict[str, float] = {}
    calls: list | None = [] if trace else None   # (method, enter, exit) on the engine thread, with --trace
    if phases:   # the engine thread's host work per step, by part (wrappers on this engine's methods only)
        for name in PHASES:
            setattr(engine, name, _timed(getattr(engine, name), name, phase_s, calls))
        sampler_launch = engine.sampler.launch
        engine.sampler.launch = _timed(sampler_launch, "sampler.launch", phase_s)
    engine.add_step_listener(on_step)
    ahead_before = engine.num_steps_ahead
    try:
        reqs = [GenerationRequest(prompt=f"NPC {i} decides what to do next:", max_new_tokens=tokens, seed=seed + i,
                                  temperature=0.8, ignore_eos=not constrained,
                                  json_schema=SCHEMA if constrained else None) for i in range(batch)]
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        wall = time.perf_counter() - t0
    finally:
        engine.remove_step_listener(on_step)
        del engine.grammars._fill
        if gate is not None:
            del gate.copy_when_open, engine.grammars.start_masks
        for name in PHASES if phases else ():
            delattr(engine, name)
        engine.sampler.__dict__.pop("launch", None)   # the class's method again, unwrapped
    # Steps overlap (the next is queued before this one's tokens are in), so a step's own span can exceed the
    # time it adds: the interval between consecutive full-batch steps is what the batch pays per token.
    intervals = [b - a for a, b in zip(ends, ends[1:]) if a is not None and b is not None]
    torch.cuda.synchronize() if gate_events else None
    gate_ms = sorted(a.elapsed_time(b) for a, b in gate_events)
    # The device's own time between one gate's end and the next gate's start (the forward, the sampling's
    # first kernels), and the mask thread's chain, by part (jobs and fills pair up: one fill per job).
    between_ms = sorted(a[1].elapsed_time(b[0]) for a, b in zip(gate_events, gate_events[1:]))
    after_gate_ms = sorted(a.elapsed_time(b) for a, b in after_gate)
    chain: dict[str, list[float]] = {"tokens_to_fill": [], "fill": [], "fill_to_open": [], "open_to_next_tokens": []}
    if len(fills) == len(jobs):
        for job, (f0, f1) in zip(jobs, fills):
            if "tokens" in job:
                chain["tokens_to_fill"].append(1000 * (f0 - job["tokens"]))
                chain["fill"].append(1000 * (f1 - f0))
                chain["fill_to_open"].append(1000 * (job["open"] - f1))
        chain["open_to_next_tokens"] = [1000 * (b["tokens"] - a["open"]) for a, b in zip(jobs, jobs[1:])
                                        if "tokens" in b]
        # of which: the next job queued after this gate opened (the engine thread late), and its wait for tokens
        chain["open_to_next_queued"] = [1000 * max(0.0, b["queued"] - a["open"]) for a, b in zip(jobs, jobs[1:])]
        chain["waits_for_tokens"] = [1000 * (j["tokens"] - j["start"]) for j in jobs if "tokens" in j]
    job_ms = [1000 * (j["open"] - j["tokens"]) for j in jobs if "tokens" in j]
    parsed = sum(1 for r in results if r.finish_reason == "stop" and _parses(r.text)) if constrained else None
    return {"batch": batch, "constrained": constrained, "full_batch_steps": len(steps),
            "step_ms_median": 1000 * statistics.median(steps) if steps else None,
            "step_ms_mean": 1000 * statistics.fmean(steps) if steps else None,
            "interval_ms_median": 1000 * statistics.median(intervals) if intervals else None,
            "interval_ms_mean": 1000 * statistics.fmean(intervals) if intervals else None,   # 1 / throughput
            "mask_ms_median": 1000 * statistics.median(mask_s) if mask_s else None,
            "tokens": sum(r.usage.completion_tokens for r in results), "wall_s": wall,
            "steps_ahead": engine.num_steps_ahead - ahead_before, "parsed": parsed,
            "phase_ms_per_step": {k: 1000 * v / max(1, len(reported)) for k, v in phase_s.items()},
            "mask_ms_per_step": 1000 * sum(mask_s) / max(1, len(reported)),
            "gated_steps": len(gate_ms), "gate_wait_ms": _spread(gate_ms), "mask_job_ms": _spread(sorted(job_ms)),
            "device_between_gates_ms": _spread(between_ms), "device_gate_to_sampled_ms": _spread(after_gate_ms), "chain_ms": {k: _spread(sorted(v)) for k, v in chain.items()},
            "timeline_s": [t - t0 for t in reported],
            "trace": {"engine": calls, "jobs": jobs, "fills": fills,
                      "gate_ms": [a.elapsed_time(b) for a, b in gate_events]} if trace else None}


def _spread(sorted_ms: list[float]) -> dict | None:
    """Median, mean, p90 and max of sorted times (None when there are none)."""
    if not sorted_ms:
        return None
    return {"median": statistics.median(sorted_ms), "mean": statistics.fmean(sorted_ms),
            "p90": sorted_ms[int(0.9 * (len(sorted_ms) - 1))], "max": sorted_ms[-1], "sum": sum(sorted_ms)}


def probe_masks(engine: LLMEngine, rows: int, seed: int = 0) -> dict:
    """One row's mask at a time, one thread: what each position of a reply costs, by how many characters remain
    in the string being written (the schema's strings are bounded). Tokens are drawn uniformly from those the
    mask allows, as random weights do."""
    import random
    rng = random.Random(seed)
    grammars = engine.grammars
    shifts = torch.arange(32, dtype=torch.int32)
    cost: dict[str, list[float]] = {}
    limits = {k: v.get("maxLength") for k, v in SCHEMA["properties"].items()}
    for _ in range(rows):
        constraint, text = grammars.start("json_schema", json.dumps(SCHEMA)), ""
        while not constraint.complete:
            t = time.perf_counter()
            mask = grammars.fill_masks([constraint])[0]
            dt = time.perf_counter() - t
            allowed = unpack_masks(mask[None], grammars.vocab_size, shifts)[0].nonzero().flatten().tolist()
            cost.setdefault(_where(text, limits), []).append(dt)
            token = allowed[rng.randrange(len(allowed))]
            if constraint.advance(token) is not None:
                break
            text += engine.tokenizer.decode([token])
    return {k: {"n": len(v), "median_ms": 1000 * statistics.median(v), "mean_ms": 1000 * statistics.fmean(v),
                "max_ms": 1000 * max(v)} for k, v in sorted(cost.items(), key=_left)}


def _where(text: str, limits: dict) -> str:
    """'structure', or the characters left in the bounded string being written (bucketed)."""
    key_end = text.rfind('":"')
    if key_end < 0 or '"' in text[key_end + 3:]:
        return "structure"
    key = text[text.rfind('"', 0, key_end) + 1:key_end]
    limit = limits.get(key)
    if limit is None:
        return "structure"
    left = limit - len(text[key_end + 3:])
    return "string, " + next(f"<= {b} chars left" for b in (2, 5, 10, 20, 40, 80) if left <= b)


def _left(item: tuple[str, list[float]]) -> int:
    return int(item[0].split()[2]) if item[0].startswith("string") else 10**6


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tokens", type=int, default=96, help="most output tokens per request")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case (the best median is kept)")
    parser.add_argument("--overlap", choices=("default", "on", "off"), default="default",
                        help="overlap_steps (default: on for CUDA, off on the CPU)")
    parser.add_argument("--out", default="bench_structured.json")
    parser.add_argument("--plot", default=None, help="PNG: the step timeline of the largest batch, free and "
                        "constrained (matplotlib, a tool dependency only)")
    parser.add_argument("--grammar-threads", type=int, default=None, help="GeneratorParams.grammar_threads")
    parser.add_argument("--mask-gate-rows", type=int, default=GeneratorParams.mask_gate_rows,
                        help="GeneratorParams.mask_gate_rows (0: masks computed on the engine thread, then sampled, "
                        "the way before session 14)")
    parser.add_argument("--probe", type=int, default=0, metavar="ROWS",
                        help="also time ROWS replies' masks one at a time, by position (1 thread)")
    parser.add_argument("--phases", action="store_true", help="also time the engine thread's parts of a step "
                        "(mean ms per step; adds a little host time of its own)")
    parser.add_argument("--grammar-originals", type=int, default=None,
                        help="matchers compiled per constraint (default: one per mask thread)")
    parser.add_argument("--switch-interval-us", type=float, default=None,
                        help="sys.setswitchinterval for this run (how long a thread may wait for the GIL; default 5000)")
    parser.add_argument("--trace", action="store_true", help="with --phases: every timed call's moments in the JSON")
    parser.add_argument("--replot", default=None, help="draw --plot from an earlier --out JSON and exit")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot or "bench_structured.png")
        return
    batches = [int(b) for b in args.batches.split(",")]
    if args.switch_interval_us:
        sys.setswitchinterval(args.switch_interval_us / 1e6)
    overlap = {"default": None, "on": True, "off": False}[args.overlap]
    gen = GeneratorParams(max_batch_size=max(batches), max_seq_len=512, overlap_steps=overlap,
                          result_cache_entries=0, grammar_threads=args.grammar_threads,
                          mask_gate_rows=args.mask_gate_rows)   # measure compute: repeats must not be answered from the cache
    rows = []
    with LLMEngine(args.model, gen, device=args.device) as engine:
        if args.grammar_originals:
            engine.grammars.originals = args.grammar_originals
        probe = probe_masks(engine, args.probe) if args.probe else None
        run(engine, 1, 8, True, 0)            # warm-up: compiles the schema, builds llguidance's token trie
        run(engine, max(batches), 8, False, 0)
        for batch in batches:
            tries: dict[bool, list[dict]] = {False: [], True: []}
            for k in range(args.repeats):     # alternated, so drifting machine load hits both alike
                for constrained in (False, True):
                    tries[constrained].append(run(engine, batch, args.tokens, constrained, 100 * k, args.phases,
                                                  args.trace))
            best = {c: min(t, key=lambda r: r["step_ms_median"] or float("inf")) for c, t in tries.items()}
            free, cons = best[False], best[True]
            overhead = (cons["step_ms_median"] / free["step_ms_median"] - 1) * 100
            interval = (cons["interval_ms_median"] / free["interval_ms_median"] - 1) * 100 \
                if cons["interval_ms_median"] and free["interval_ms_median"] else None
            mean = (cons["interval_ms_mean"] / free["interval_ms_mean"] - 1) * 100 \
                if cons["interval_ms_mean"] and free["interval_ms_mean"] else None
            rows.append({"batch": batch, "free": free, "constrained": cons, "step_overhead_pct": overhead,
                         "interval_overhead_pct": interval, "throughput_loss_pct": mean})
        meta = {"model": engine.model_name, "device": str(engine.device), "dtype": str(engine.dtype),
                "overlap_steps": engine.overlap_steps, "tokens": args.tokens, "schema_fields": len(SCHEMA["properties"]),
                "grammar_threads": engine.grammars.threads,
                "grammar_originals": engine.grammars.originals, "mask_gate_rows": args.mask_gate_rows if engine._mask_gate is not None else 0}
    print(f"model {meta['model']} on {meta['device']} ({meta['dtype']}, overlap_steps={meta['overlap_steps']}, "
          f"mask gate from {meta['mask_gate_rows']} rows (0: off)); "
          f"10-field schema, up to {args.tokens} tokens")
    print(f"{'batch':>5} {'free ms/step':>13} {'schema ms/step':>15} {'overhead':>9} "
          f"{'interval free/schema ms':>24} {'overhead':>9} {'mean interval':>14} {'loss':>7} {'mask ms':>8} "
          f"{'steps ahead free/schema':>24} {'parsed':>7}")
    for r in rows:
        f, c = r["free"], r["constrained"]
        gap = f"{r['interval_overhead_pct']:>8.1f}%" if r["interval_overhead_pct"] is not None else f"{'-':>9}"
        print(f"{r['batch']:>5} {f['step_ms_median']:>13.2f} {c['step_ms_median']:>15.2f} "
              f"{r['step_overhead_pct']:>8.1f}% {f['interval_ms_median'] or 0:>11.2f}/{c['interval_ms_median'] or 0:<12.2f}"
              f"{gap} {f['interval_ms_mean'] or 0:>6.2f}/{c['interval_ms_mean'] or 0:<7.2f}"
              f"{r['throughput_loss_pct'] if r['throughput_loss_pct'] is not None else 0:>6.1f}% {c['mask_ms_median']:>8.3f} "
              f"{f['steps_ahead']:>11}/{c['steps_ahead']:<12} {c['parsed']:>3}/{r['batch']}")
    if args.phases:
        print("engine thread, mean ms per step (all steps of the best run):")
        for r in rows:
            for key in ("free", "constrained"):
                parts = {**r[key]["phase_ms_per_step"], "fill_masks": r[key]["mask_ms_per_step"]}
                print(f"  batch {r['batch']:>2} {key:<12} " + "  ".join(f"{k.strip('_')} {v:.3f}" for k, v in parts.items()))
        for r in rows:
            c = r["constrained"]
            if c["gate_wait_ms"]:
                w, j = c["gate_wait_ms"], c["mask_job_ms"]
                print(f"  batch {r['batch']:>2} gated steps {c['gated_steps']}: device waits at the gate median "
                      f"{w['median']:.3f} mean {w['mean']:.3f} p90 {w['p90']:.3f} max {w['max']:.2f} ms; tokens in"
                      f" -> gate open median {j['median']:.3f} mean {j['mean']:.3f} p90 {j['p90']:.3f} max {j['max']:.2f}")
                d, a = c["device_between_gates_ms"], c["device_gate_to_sampled_ms"]
                if a:
                    print(f"    device from the gate's copy to the tokens' copy median {a['median']:.3f} mean {a['mean']:.3f}"
                          f" p90 {a['p90']:.3f} ms")
                print(f"    device between gates median {d['median']:.3f} mean {d['mean']:.3f}; mask thread, median (mean) ms: "
                      + "  ".join(f"{k} {v['median']:.3f} ({v['mean']:.3f})" for k, v in c["chain_ms"].items() if v))
    if probe:
        print(f"masks one row at a time ({args.probe} replies, 1 thread), by position:")
        for where, c in probe.items():
            print(f"  {where:<28} n={c['n']:>5}  median {c['median_ms']:.3f} ms  mean {c['mean_ms']:.3f}  "
                  f"max {c['max_ms']:.2f}")
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "probe": probe}, indent=1))
    print(f"wrote {args.out}")
    if args.plot:
        plot({"meta": meta, "rows": rows}, args.plot)


def plot(report: dict, path: str) -> None:
    """Time between consecutive steps over each run of the largest batch: a host stall is a step that comes
    late, so it shows as a spike of the constrained line over the free one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    row = max(report["rows"], key=lambda r: r["batch"])
    fig, ax = plt.subplots(figsize=(10, 4))
    for key, label in (("free", "free"), ("constrained", "10-field JSON Schema")):
        t = row[key]["timeline_s"]
        ax.plot([1000 * x for x in t[1:]], [1000 * (b - a) for a, b in zip(t, t[1:])], ".", ms=3,
                label=f"{label} (median step interval {row[key]['interval_ms_median']:.2f} ms)")
    meta = report["meta"]
    ax.set_xlabel("ms since the batch was submitted")
    ax.set_ylabel("ms since the previous step")
    ax.set_yscale("log")
    ax.set_title(f"Batch {row['batch']}, {meta['model'].split('/')[-1]} on {meta['device']}: step timeline")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

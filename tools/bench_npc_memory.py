"""NPC memory benchmark: restoring a saved 2,000-token conversation (a KV snapshot) against prefilling it again,
and snapshot bytes per token (raw and int8).

For each of `--repeats` rounds, in fresh engines that share the loaded weights (so nothing is cached), each
past its start-up (it serves one unrelated 16-token request before it is timed):
- prefill: the history's first token of the continuation: `generate(history + line, max_new_tokens=1)` in a cold
  engine (time to the first token: the whole history is prefilled);
- restore: `engine.restore(blob)` (checks, decode and the KV write into the pool), then the same request in that
  engine (only `line` and the history's last partial block are prefilled); reported alone and together.
Also the snapshot export time and size. The target (issue #23): restore <= 10 % of the prefill.

    python tools/bench_npc_memory.py [--model NAME|DIR] [--device cpu|cuda] [--history-tokens 2000]
                                     [--repeats 3] [--threads 2] [--dtype auto] [--out bench_npc_memory.json]
    # GPU, Llama-3.2-1B shape with random weights (tools/make_random_model.py writes it once; needs CUDA):
    python tools/bench_npc_memory.py --device cuda --random-shape 1b --tokenizer ~/.cache/gllm/test-fixtures/tokenizer-llama3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINE = "\nPlayer: And what became of the dragon after that?\nGuard:"
STORY = ("Guard: Halt! Who goes there? Player: A traveller from the south, looking for the smith. Guard: The "
         "smith, Brann, works by the river gate past the tannery; mind the dogs. Player: What news from the "
         "north road? Guard: Wolves at night, and the old watchtower burned again last week. ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a known name, HF folder or .gguf (default: the default model)")
    parser.add_argument("--random-shape", default=None, help="1b/3b/8b: a random-weight Llama in that shape "
                        "(made once under --random-dir by tools/make_random_model.py, which needs CUDA)")
    parser.add_argument("--tokenizer", default=None, help="with --random-shape: the Llama 3 tokenizer folder")
    parser.add_argument("--random-dir", default="/tmp/gllm-random-models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--history-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="bench_npc_memory.json")
    args = parser.parse_args()

    model = args.model
    if args.random_shape:
        if not args.tokenizer:
            parser.error("--random-shape needs --tokenizer")
        model = str(Path(args.random_dir) / f"llama-{args.random_shape}")
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_model.py"), "--shape", args.random_shape,
                        "--tokenizer", args.tokenizer, "--out", model], check=True)

    import torch

    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.engine.assembly import pick_device
    from gllm.engine.device_dtype import auto_dtype
    from gllm.engine.loading import load
    from gllm.model import parse_dtype

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = parse_dtype(auto_dtype(device)[0] if args.dtype == "auto" else args.dtype)
    max_seq_len = max(4096, args.history_tokens + 256)
    loaded = load(model, dtype=dtype, device=device, max_positions=max_seq_len)
    params = GeneratorParams(max_batch_size=4, max_seq_len=max_seq_len, cpu_threads=args.threads,
                             dtype=str(dtype).removeprefix("torch."), result_cache_entries=0,
                             kv_cache_tokens=2 * max_seq_len)

    def engine() -> LLMEngine:
        """A fresh engine (nothing cached) past its start-up: one token for an unrelated 16-token prompt waits
        for its engine thread's set-up (on a GPU, capturing its CUDA graphs), which a restore or a prefill
        issued at once would share the device and the GIL with."""
        eng = LLMEngine(loaded, params, device=str(device))
        eng.generate(GenerationRequest(prompt_token_ids=[tok.bos_token_id or 1] + [7] * 15, max_new_tokens=1,
                                       temperature=0))
        return eng

    tok = loaded.tokenizer
    story = tok.encode(STORY * (args.history_tokens // 40 + 2), add_special_tokens=False)
    line = tok.encode(LINE, add_special_tokens=False)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def first_token(eng: LLMEngine, ids: list[int]) -> tuple[float, object]:
        sync()
        start = time.perf_counter()
        result = eng.generate(GenerationRequest(prompt_token_ids=ids, max_new_tokens=1, temperature=0,
                                                ignore_eos=True))[0]
        sync()
        return time.perf_counter() - start, result

    warm = engine()   # compile / warm the kernels once (not timed)
    first_token(warm, story[:256])
    warm.close()

    rounds = []
    for r in range(args.repeats):
        history = [tok.bos_token_id or 1] + story[: args.history_tokens - 1]   # fresh engines: nothing cached
        with engine() as cold:
            prefill_s, _ = first_token(cold, history + line)
        with engine() as source:
            first_token(source, history)      # the NPC's conversation so far, in the cache
            started = time.perf_counter()
            blob = source.snapshot(history)
            export_s = time.perf_counter() - started
            blob8 = source.snapshot(history, encoding="int8")
            n = source.snapshot_tokens(blob)
        with engine() as target:
            sync()
            started = time.perf_counter()
            info = target.restore(blob)
            sync()
            restore_s = time.perf_counter() - started
            continue_s, result = first_token(target, history + line)
        assert info.tokens == n and result.usage.cached_tokens == n, (info, result.usage)
        with engine() as target8:
            started = time.perf_counter()
            target8.restore(blob8)
            sync()
            restore8_s = time.perf_counter() - started
        rounds.append({"prefill_s": prefill_s, "export_s": export_s, "restore_s": restore_s,
                       "restore_check_s": info.check_s, "restore_write_s": info.write_s,
                       "restore_plus_first_token_s": restore_s + continue_s, "restore_int8_s": restore8_s,
                       "snapshot_tokens": n, "raw_bytes": len(blob), "int8_bytes": len(blob8)})
        print(f"round {r + 1}: prefill {prefill_s * 1e3:.0f} ms, restore {restore_s * 1e3:.1f} ms "
              f"(+ first token {continue_s * 1e3:.1f} ms), int8 restore {restore8_s * 1e3:.1f} ms", flush=True)

    def med(key: str) -> float:
        return statistics.median(x[key] for x in rounds)

    n = rounds[0]["snapshot_tokens"]
    summary = {
        "model": str(model or "default"), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads, "history_tokens": args.history_tokens, "snapshot_tokens": n,
        "prefill_ms": med("prefill_s") * 1e3, "restore_ms": med("restore_s") * 1e3,
        "restore_plus_first_token_ms": med("restore_plus_first_token_s") * 1e3,
        "restore_int8_ms": med("restore_int8_s") * 1e3, "export_ms": med("export_s") * 1e3,
        "restore_check_ms": med("restore_check_s") * 1e3, "restore_write_ms": med("restore_write_s") * 1e3,
        "restore_over_prefill": med("restore_s") / med("prefill_s"),
        "restore_plus_first_token_over_prefill": med("restore_plus_first_token_s") / med("prefill_s"),
        "raw_bytes_per_token": rounds[0]["raw_bytes"] / n, "int8_bytes_per_token": rounds[0]["int8_bytes"] / n,
        "int8_over_raw": rounds[0]["int8_bytes"] / rounds[0]["raw_bytes"], "rounds": rounds,
    }
    print()
    print(f"{summary['model']} on {summary['device']} ({summary['dtype']}, {args.threads} threads), "
          f"{args.history_tokens}-token history, {n} tokens in the snapshot, medians of {args.repeats}:")
    rows = [("re-prefill (first token)", summary["prefill_ms"], 1.0),
            ("restore", summary["restore_ms"], summary["restore_over_prefill"]),
            ("  of which checks + upload", summary["restore_check_ms"],
             summary["restore_check_ms"] / summary["prefill_ms"]),
            ("  of which engine thread", summary["restore_write_ms"],
             summary["restore_write_ms"] / summary["prefill_ms"]),
            ("restore + first token", summary["restore_plus_first_token_ms"],
             summary["restore_plus_first_token_over_prefill"]),
            ("restore (int8 blob)", summary["restore_int8_ms"], summary["restore_int8_ms"] / summary["prefill_ms"]),
            ("snapshot export (raw)", summary["export_ms"], summary["export_ms"] / summary["prefill_ms"])]
    print(f"{'':28}{'ms':>10}{'x prefill':>12}")
    for name, ms, ratio in rows:
        print(f"{name:28}{ms:10.1f}{ratio:12.3f}")
    print(f"snapshot bytes per token: raw {summary['raw_bytes_per_token']:.0f}, int8 "
          f"{summary['int8_bytes_per_token']:.0f} ({summary['int8_over_raw']:.3f} x raw)")
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

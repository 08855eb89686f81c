"""Three NPCs answer one player line at once, over one shared model, each line growing as its tokens arrive.

Their system prompts share a world-lore prefix, so its KV blocks are computed once and reused
(prefix caching). Then prints per-NPC tokens/s, time to first token, prefix-cache hits and memory.

    python examples/python/npc_scene.py [--model NAME_OR_PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

LORE = ("You live in Eldmoor, a river town under the Ashen Mountains. The old dragon Veyra sleeps in "
        "the northern peaks; the smiths' guild forges her shed scales into armour; the Duke taxes "
        "every cart that crosses the Stone Bridge. Strangers arrived last night asking about the dragon. "
        "Answer in character, in one or two short sentences.\n\n")
NPCS = {
    "Guard": "You are Brann, a tired town guard who distrusts strangers.",
    "Smith": "You are Hilde, a cheerful blacksmith who loves talking about her craft.",
    "Priest": "You are Father Osric, a nervous priest who fears the dragon will wake.",
}
PLAYER_LINE = "Have you seen anything strange near the mountains lately?"
COLOURS = {"Guard": "\033[33m", "Smith": "\033[36m", "Priest": "\033[35m"}
RESET = "\033[0m"
SMALL_MODEL_NOTE = (
    "Note: the default model, SmolLM2-135M-Instruct, is tiny (it fits anywhere and shows the batching), so it\n"
    "often ignores its persona and repeats itself. For real NPC dialogue run a bigger Llama-3.x-family model you\n"
    "have: --model path/to/model.gguf (e.g. Llama-3.2-3B-Instruct Q4_K_M) or --model path/to/hf-folder.")


class Board:
    """One line per NPC. On a terminal each line grows in place (the tail is kept when it outgrows the width);
    elsewhere (a pipe, a log) each NPC's whole line is printed once, when it is finished."""

    def __init__(self, names: list[str], live: bool) -> None:
        self.names, self.live = names, live
        self.text = {name: "" for name in names}
        if live:
            print("\n" * (len(names) - 1), flush=True)

    def add(self, name: str, delta: str) -> None:
        self.text[name] += delta
        if self.live:
            self._redraw()

    def finish(self, name: str) -> None:
        if not self.live:
            print(f"[{name}] {self._clean(name)}", flush=True)

    def _clean(self, name: str) -> str:
        return " ".join(self.text[name].split())

    def _redraw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        out = [f"\033[{len(self.names)}F"]                     # to the first NPC's line
        for name in self.names:
            room = max(10, width - len(name) - 4)
            text = self._clean(name)
            text = text if len(text) <= room else "…" + text[-(room - 1):]
            out.append(f"\033[2K{COLOURS[name]}[{name}]{RESET} {text}\n")
        sys.stdout.write("".join(out))
        sys.stdout.flush()


async def speak(engine: LLMEngine, board: Board, name: str, seed: int):
    req = GenerationRequest(messages=[{"role": "system", "content": LORE + NPCS[name]},
                                      {"role": "user", "content": PLAYER_LINE}],
                            max_new_tokens=48, temperature=0.7, top_p=0.9, seed=seed, request_id=name)
    async for event in engine.stream(req):
        if event.text:
            board.add(name, event.text)
        if event.result is not None:
            board.finish(name)
            return name, event.result
    raise RuntimeError("stream ended early")


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:          # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


async def scene(engine: LLMEngine, live: bool) -> None:
    print(f"Player: {PLAYER_LINE}\n")
    board = Board(list(NPCS), live)
    started = time.perf_counter()
    results = await asyncio.gather(*(speak(engine, board, name, seed) for seed, name in enumerate(NPCS)))
    wall = time.perf_counter() - started
    print()
    for name, r in results:
        decode_s = max((r.timings.total_ms - (r.timings.ttft_ms or 0)) / 1000, 1e-9)
        rate = max(r.usage.completion_tokens - 1, 0) / decode_s
        print(f"{name:>6}: {r.usage.completion_tokens} tokens at {rate:.1f} "
              f"tok/s, first token after {r.timings.ttft_ms:.0f} ms; prompt {r.usage.prompt_tokens} tokens "
              f"({r.usage.cached_tokens} from the prefix cache); finished: {r.finish_reason}")
    stats = engine.stats()
    total = sum(r.usage.completion_tokens for _, r in results)
    rss = peak_rss_mb()
    print(f"\nscene: {total} tokens in {wall:.2f} s ({total / wall:.1f} tok/s across the NPCs); "
          f"prefix cache: {stats['prefix_cache_hits']} blocks reused, {stats['prefix_cache_misses']} computed"
          + (f"; peak memory (RSS) {rss:.0f} MB" if rss else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="known name, HF folder, .gguf or HF cache id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--plain", action="store_true", help="no in-place updates (the default off a terminal)")
    args = parser.parse_args()
    live = sys.stdout.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
    with LLMEngine(args.model, GeneratorParams(max_batch_size=8, max_seq_len=1024), device=args.device,
                   quiet=False) as engine:
        print(f"model {engine.model_name} on {engine.device}, {engine.weight_format}, "
              f"{engine.weight_bytes / 2**20:.0f} MiB of weights, loaded in {engine.load_seconds:.2f} s")
        if args.model is None:
            print(SMALL_MODEL_NOTE)
        print()
        asyncio.run(scene(engine, live))


if __name__ == "__main__":
    main()

"""Three NPCs answer one player line at once, streaming interleaved, over one shared model.

Their system prompts share a world-lore prefix, so its KV blocks are computed once and reused
(prefix caching). Prints per-NPC tokens/s, time to first token and prefix-cache hits.

    python examples/python/npc_scene.py [--model NAME_OR_PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import asyncio
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


async def speak(engine: LLMEngine, name: str, seed: int) -> tuple[str, object]:
    req = GenerationRequest(messages=[{"role": "system", "content": LORE + NPCS[name]},
                                      {"role": "user", "content": PLAYER_LINE}],
                            max_new_tokens=48, temperature=0.7, top_p=0.9, seed=seed, request_id=name)
    async for event in engine.stream(req):
        if event.text:
            print(f"{COLOURS[name]}[{name}] {event.text!r}\033[0m", flush=True)
        if event.result is not None:
            return name, event.result
    raise RuntimeError("stream ended early")


async def scene(engine: LLMEngine) -> None:
    print(f"Player: {PLAYER_LINE}\n")
    started = time.perf_counter()
    results = await asyncio.gather(*(speak(engine, name, seed) for seed, name in enumerate(NPCS)))
    wall = time.perf_counter() - started
    print()
    for name, r in results:
        decode_s = max((r.timings.total_ms - (r.timings.ttft_ms or 0)) / 1000, 1e-9)
        print(f"{name:>6}: {r.text.strip()!r}")
        print(f"        {r.usage.completion_tokens} tokens, {max(r.usage.completion_tokens - 1, 0) / decode_s:.1f} tok/s, "
              f"first token {r.timings.ttft_ms:.0f} ms, prompt {r.usage.prompt_tokens} tokens "
              f"({r.usage.cached_tokens} from the prefix cache), {r.finish_reason}")
    stats = engine.stats()
    total = sum(r.usage.completion_tokens for _, r in results)
    print(f"\nscene: {total} tokens in {wall:.2f} s ({total / wall:.1f} tok/s across NPCs); "
          f"prefix-cache hits {stats['prefix_cache_hits']} blocks, misses {stats['prefix_cache_misses']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="known name, HF folder, .gguf or HF cache id (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    with LLMEngine(args.model, GeneratorParams(max_batch_size=8, max_seq_len=1024), device=args.device,
                   quiet=False) as engine:
        how = "warm, from the converted cache" if engine.loaded_warm else "cold: fetched/converted"
        print(f"model {engine.model_name} on {engine.device}, loaded in {engine.load_seconds:.2f} s ({how})\n")
        asyncio.run(scene(engine))


if __name__ == "__main__":
    main()

"""The smallest asyncio program: one NPC answers with `await engine.enqueue_request(...)`,
while the "game loop" coroutine keeps ticking — the engine steps on its own thread.

    python examples/python/async_npc.py [--model NAME_OR_PATH]
"""

from __future__ import annotations

import argparse
import asyncio

from gllm.engine import GenerationRequest, LLMEngine


async def game_loop(stop: asyncio.Event) -> int:
    frames = 0
    while not stop.is_set():
        frames += 1                       # a real game would update and render here
        await asyncio.sleep(1 / 60)
    return frames


async def main(model: str | None) -> None:
    with LLMEngine(model) as engine:      # default: SmolLM2-135M-Instruct, fetched once from PyPI
        stop = asyncio.Event()
        ticker = asyncio.create_task(game_loop(stop))
        result = await engine.enqueue_request(GenerationRequest(
            messages=[{"role": "system", "content": "You are Mira, a fox merchant. Be brief."},
                      {"role": "user", "content": "What do you sell?"}],
            max_new_tokens=40, temperature=0.7, seed=1))
        stop.set()
        print(f"Mira: {result.text.strip()}")
        print(f"({result.usage.completion_tokens} tokens, first after {result.timings.ttft_ms:.0f} ms, "
              f"{result.finish_reason}; the game loop ran {await ticker} frames meanwhile)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    asyncio.run(main(parser.parse_args().model))

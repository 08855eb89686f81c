"""Three NPCs over the bridge with asyncio: `await client.generate(...)` and `async for ... in client.stream(...)`.

    gllm serve --model PATH                     # in another terminal
    python examples/python/bridge_async.py [--zmq tcp://127.0.0.1:5555] [--token SECRET]
"""

from __future__ import annotations

import argparse
import asyncio

from gllm.bridge.client import AsyncBridgeClient, Token

NPCS = ["a tired town guard", "a cheerful blacksmith", "a nervous priest"]


async def main(address: str, token: str | None) -> None:
    async with AsyncBridgeClient(address, token=token, name="example-async/0.1") as client:
        print(f"connected to {client.welcome.model}")

        async def npc(i: int, who: str) -> None:
            messages = [{"role": "system", "content": f"You are {who}. Answer in one sentence."},
                        {"role": "user", "content": "What news from the mountains?"}]
            async for ev in client.stream(messages=messages, max_tokens=40, temperature=0.7, seed=i):
                if isinstance(ev, Token):
                    print(f"[{i}] {ev.text!r}")
                else:
                    print(f"[{i}] done ({ev.finish_reason}): {ev.text!r}")

        await asyncio.gather(*(npc(i, who) for i, who in enumerate(NPCS)))
        done = await client.generate(prompt="The guard shouted:", max_tokens=16, temperature=0)
        print(f"one more, awaited whole: {done.text!r} ({done.timings})")
        print("stats:", await client.stats())


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zmq", default="tcp://127.0.0.1:5555")
    ap.add_argument("--token", default=None)
    args = ap.parse_args()
    asyncio.run(main(args.zmq, args.token))

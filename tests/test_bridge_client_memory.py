"""The Python clients' NPC-memory methods (snapshot, restore, pin, unpin, embed) and `idle`, against real
`python -m gllm.bridge` processes: the blocking `BridgeClient` methods and the `AsyncBridgeClient` coroutines
return typed results, server errors come back as `BridgeError` with the server's code, and events that arrive
while a method waits stay queued for `poll`."""

from __future__ import annotations

import asyncio
import time

import pytest

from gllm.bridge.client import (
    AsyncBridgeClient,
    BridgeClient,
    BridgeError,
    Done,
    Embeddings,
    Pinned,
    Restored,
    Snapshot,
)

from bridge_doubles import ServerProcess

ARGS = ("--max-seq-len", "256", "--cpu-threads", "1", "--dtype", "float32", "--kv-cache-tokens", "1024")
HISTORY = "Guard: Halt! Who goes there?\nPlayer: A traveller, looking for the smith.\nGuard:"
LORE = [{"role": "system", "content": "You are Brann, a tired town guard of Eldmoor. " * 4}]


def greedy(client: BridgeClient, prompt: str, id: str) -> Done:
    client.generate(prompt, id=id, max_tokens=16, temperature=0.0, ignore_eos=True, cache_result=False)
    return client.wait(id, timeout_s=120)


def test_snapshot_restores_on_a_fresh_server_and_damage_is_a_typed_error(llama32_dir):
    with ServerProcess(llama32_dir, *ARGS, "--max-message-bytes", str(8 << 20)) as first:
        with BridgeClient(first.connect_endpoint()) as a:
            a.connect()
            done = greedy(a, HISTORY, "npc")
            blob = a.snapshot("npc")
            assert isinstance(blob, Snapshot) and isinstance(blob, bytes) and blob.tokens > 0
            small = a.snapshot("npc", encoding="int8")
            assert small.tokens == blob.tokens and len(small) < 0.6 * len(blob)
            follow = HISTORY + done.text + "\nPlayer: And the dragon?\nGuard:"
            expected = greedy(a, follow, "next")
            with pytest.raises(BridgeError) as unknown:
                a.snapshot("never-ran", id="s-bad")
            assert unknown.value.code == "bad_request" and unknown.value.request_id == "s-bad"
            with pytest.raises(ValueError):
                a.snapshot("npc", tokens=[1, 2, 3])
    with ServerProcess(llama32_dir, *ARGS, "--max-message-bytes", str(8 << 20)) as second:
        with BridgeClient(second.connect_endpoint()) as b:
            b.connect()
            damaged = bytearray(small)
            damaged[-100] ^= 1
            with pytest.raises(BridgeError) as bad:
                b.restore(bytes(damaged))
            assert bad.value.code == "bad_request" and "checksum" in bad.value.message
            info = b.restore(small)
            assert isinstance(info, Restored) and info.tokens == small.tokens // 16 * 16 > 0
            assert info.new_blocks == info.tokens // 16
            got = greedy(b, follow, "next")
            assert got.text == expected.text
            assert got.usage["cached_tokens"] >= info.tokens


def test_pin_unpin_embed_idle_and_queued_events(llama32_dir):
    with ServerProcess(llama32_dir, *ARGS) as srv:
        with BridgeClient(srv.connect_endpoint()) as c:
            c.connect()
            before = c.stats()["window_reports"]
            for _ in range(3):
                c.idle(4.0)
            pinned = c.pin(messages=LORE)
            assert isinstance(pinned, Pinned) and pinned.pin.startswith("pin-") and pinned.tokens >= 32
            stats = c.stats()
            assert stats["window_reports"] == before + 3
            assert stats["pins"] == 1 and stats["pinned_blocks"] == pinned.tokens // 16
            assert c.pin(messages=LORE).pin == pinned.pin
            assert c.unpin(pinned.pin) is True and c.unpin(pinned.pin) is False
            with pytest.raises(BridgeError) as refused:
                c.pin(tokens=list(range(1000, 1900)), id="too-much")
            assert refused.value.code == "too_long" and refused.value.request_id == "too-much"

            rid = c.generate("The bard sang of", max_tokens=8, temperature=0.0, ignore_eos=True)
            vectors = c.embed(["the smith", "the dragon", "the smith"])   # the generate's events queue meanwhile
            assert isinstance(vectors, Embeddings) and len(vectors) == 3 and vectors.prompt_tokens > 0
            assert vectors[0] == vectors[2] and vectors[0] != vectors[1]
            assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in vectors)
            assert c.embed("the dragon")[0] == vectors[1]
            with pytest.raises(BridgeError) as empty:
                c.embed([""])
            assert empty.value.code == "bad_request" and "input" in empty.value.message
            assert c.wait(rid, timeout_s=60).finish_reason == "length"
            assert c.stats()["pins"] == 0


def test_async_client_memory_ops(llama32_dir):
    async def main(endpoint: str) -> None:
        async with AsyncBridgeClient(endpoint) as c:
            before = (await c.stats())["window_reports"]
            await c.idle(3.0)
            await c.idle(3.0)
            done = await c.generate(HISTORY, id="npc", max_tokens=8, temperature=0.0, ignore_eos=True)
            assert done.finish_reason == "length"
            blob = await c.snapshot("npc", encoding="int8")
            assert isinstance(blob, Snapshot) and blob.tokens > 0
            restored = await c.restore(blob)
            assert restored.tokens == blob.tokens // 16 * 16 and restored.new_blocks == 0   # still cached here
            with pytest.raises(BridgeError) as bad:
                await c.restore(b"junk")
            assert bad.value.code == "bad_request"
            pinned, vectors = await asyncio.gather(c.pin("Once upon a time in Eldmoor " * 4),
                                                   c.embed(["a", "b"]))
            assert pinned.tokens >= 16 and len(vectors) == 2
            assert await c.unpin(pinned.pin) is True
            deadline = time.monotonic() + 5
            while (await c.stats())["window_reports"] < before + 2:
                assert time.monotonic() < deadline, "the idle reports were not counted"
                await asyncio.sleep(0.05)

    with ServerProcess(llama32_dir, *ARGS) as srv:
        asyncio.run(main(srv.connect_endpoint()))

"""The bridge's NPC-memory ops against real `python -m gllm.bridge` processes: a conversation saved from one
server (snapshot, a msgpack bin) and restored into a fresh one continues token for token; bad blobs and
oversized snapshots are typed errors and the server serves on; pin/unpin/embed round trips; a repeated
greedy generate is answered from the result cache with one tokens item and done.usage.cached."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from gllm.bridge import protocol as P

from bridge_doubles import ServerProcess

ARGS = ("--max-seq-len", "256", "--cpu-threads", "1", "--dtype", "float32")
HISTORY = "Guard: Halt! Who goes there?\nPlayer: A traveller, looking for the smith.\nGuard:"


class Raw:
    """A DEALER speaking msgpack maps: enough for ops the Python client has no method for."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.sock.send(P.encode(P.hello("test/memory")))
        assert self.recv_op("welcome")["op"] == "welcome"

    def send(self, msg: dict) -> None:
        self.sock.send(P.encode(msg))

    def recv(self, timeout_s: float = 60.0) -> dict:
        assert self.sock.poll(int(timeout_s * 1000)), "no message"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def recv_op(self, *ops: str, id: str | None = None, timeout_s: float = 60.0) -> dict:
        """The next message of one of `ops` (or an error) for `id`; tokens and others in between are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if (msg["op"] in ops or msg["op"] == "error") and (id is None or msg.get("id") == id):
                return msg

    def generate(self, id: str, prompt: str, **fields) -> tuple[dict, list[dict]]:
        self.send(P.generate(id, prompt=prompt, max_tokens=16, temperature=0.0, ignore_eos=True, **fields))
        items = []
        while True:
            msg = self.recv()
            if msg["op"] == "tokens":
                items += [it for it in msg["items"] if it["id"] == id]
            elif msg["op"] in ("done", "error") and msg.get("id") == id:
                return msg, items

    def call(self, msg: dict, reply: str) -> dict:
        self.send(msg)
        return self.recv_op(reply, id=msg.get("id"))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def raw_to(llama32_dir):
    opened = []

    def connect(srv: ServerProcess) -> Raw:
        opened.append(Raw(srv.connect_endpoint()))
        return opened[-1]

    yield connect
    for r in opened:
        r.close()


def test_a_saved_conversation_continues_identically_on_a_fresh_server(llama32_dir, raw_to):
    with ServerProcess(llama32_dir, *ARGS, "--max-message-bytes", str(8 << 20)) as first:
        a = raw_to(first)
        done, _ = a.generate("npc", HISTORY, cache_result=False)
        saved = a.call(P.snapshot_request("save", conversation="npc"), "snapshot")
        assert saved["op"] == "snapshot" and isinstance(saved["blob"], bytes) and saved["tokens"] > 0
        small = a.call(P.snapshot_request("save8", conversation="npc", encoding="int8"), "snapshot")
        assert small["tokens"] == saved["tokens"] and len(small["blob"]) <= 0.55 * len(saved["blob"])
        follow = HISTORY + done["text"] + "\nPlayer: And the dragon?\nGuard:"
        expected, _ = a.generate("next", follow, cache_result=False)
    with ServerProcess(llama32_dir, *ARGS, "--max-message-bytes", str(8 << 20)) as second:
        b = raw_to(second)
        cold, _ = b.generate("cold", "Unrelated warm-up line.", cache_result=False)
        restored = b.call(P.restore("load", saved["blob"]), "restored")
        assert restored == {"op": "restored", "id": "load", "tokens": saved["tokens"] // 16 * 16,
                            "new_blocks": saved["tokens"] // 16}
        got, _ = b.generate("next", follow, cache_result=False)
        assert got["text"] == expected["text"]
        assert got["usage"]["cached_tokens"] == expected["usage"]["cached_tokens"] >= restored["tokens"] > 0
        stats = b.call({"op": "stats"}, "stats")
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]


def test_bad_blobs_and_oversized_snapshots_are_errors_and_the_server_serves_on(llama32_dir, raw_to):
    with ServerProcess(llama32_dir, *ARGS, "--max-message-bytes", "20000") as srv:
        c = raw_to(srv)
        done, _ = c.generate("npc", HISTORY * 3, cache_result=False)
        big = c.call(P.snapshot_request("s1", conversation="npc"), "snapshot")
        assert big["op"] == "error" and big["code"] == "too_long" and "max_message_bytes" in big["message"]
        fits = c.call(P.snapshot_request("s2", conversation="npc", encoding="int8"), "snapshot")
        assert fits["op"] == "snapshot", fits
        for blob, code, words in [(b"junk", "bad_request", "not a gllm snapshot"),
                                  (fits["blob"][:-7], "bad_request", "truncated"),
                                  (fits["blob"][:-100] + bytes([fits["blob"][-100] ^ 1]) + fits["blob"][-99:],
                                   "bad_request", "checksum")]:
            err = c.call(P.restore("r", blob), "restored")
            assert (err["op"], err["code"], err["id"]) == ("error", code, "r") and words in err["message"], err
        unknown = c.call(P.snapshot_request("s3", conversation="never-ran"), "snapshot")
        assert unknown["op"] == "error" and unknown["code"] == "bad_request" and unknown["id"] == "s3"
        c.send({"op": "restore", "id": "r2", "blob": b"x" * 30_000})      # over max_message_bytes
        assert c.recv_op("restored")["code"] == "too_long"
        assert c.call(P.restore("r3", fits["blob"]), "restored")["tokens"] == fits["tokens"]
        again, _ = c.generate("after", "Still serving?", cache_result=False)
        assert again["op"] == "done" and again["finish_reason"] == "length"


def test_pin_unpin_embed_and_the_result_cache_over_the_bridge(llama32_dir, raw_to):
    with ServerProcess(llama32_dir, *ARGS, "--kv-cache-tokens", "384") as srv:   # pins may hold 8 of 24 blocks
        c = raw_to(srv)
        system = [{"role": "system", "content": "You are Brann, a tired town guard of Eldmoor. " * 4}]
        pinned = c.call(P.pin("p", messages=system), "pinned")
        assert pinned["op"] == "pinned" and pinned["pin"].startswith("pin-") and pinned["tokens"] >= 32
        stats = c.call({"op": "stats"}, "stats")
        assert stats["pins"] == 1 and stats["pinned_blocks"] == pinned["tokens"] // 16
        assert c.call(P.pin("p2", messages=system), "pinned")["pin"] == pinned["pin"]
        assert c.call(P.unpin("u", pinned["pin"]), "unpinned") == {"op": "unpinned", "id": "u",
                                                                   "pin": pinned["pin"], "found": True}
        assert c.call(P.unpin("u2", pinned["pin"]), "unpinned")["found"] is False
        refused = c.call(P.pin("p3", tokens=list(range(1000, 1250))), "pinned")
        assert refused["op"] == "error" and refused["code"] == "too_long" and refused["id"] == "p3"

        vectors = c.call(P.embed("e", ["the smith", "the dragon", "the smith"]), "embeddings")
        assert len(vectors["vectors"]) == 3 and vectors["vectors"][0] == vectors["vectors"][2]
        assert all(abs(sum(x * x for x in v) - 1) < 1e-5 for v in vectors["vectors"])
        assert c.call(P.embed("e2", "the dragon"), "embeddings")["vectors"][0] == vectors["vectors"][1]

        first, _ = c.generate("g1", "The bard sang of")
        second, items = c.generate("g2", "The bard sang of")
        assert "cached" not in first["usage"] and second["usage"]["cached"] is True
        assert second["text"] == first["text"] and len(items) == 1 and items[0]["n"] == 16
        assert items[0]["text"] == second["text"]
        stats = c.call({"op": "stats"}, "stats")
        assert stats["result_cache_hits"] == 1 and stats["pins"] == 0
        assert stats["kv_free_blocks"] == stats["kv_total_blocks"]

"""Python clients of the gllm bridge.

`BridgeClient` is for game loops: `connect()` once, then `generate(...)` returns at once with the
request id, and `poll(max_ms)` — called once per frame — returns whatever events arrived, waiting
at most `max_ms` (0: not at all). It keeps the session's lease alive by itself from `poll`.

    client = BridgeClient("tcp://127.0.0.1:5555")
    client.connect()
    rid = client.generate(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
    while running:                       # the game loop
        for ev in client.poll(2):
            if isinstance(ev, Token): show(ev.id, ev.text)
            elif isinstance(ev, Done): finish(ev.id, ev.text)

`AsyncBridgeClient` is the asyncio form: `await client.generate(...)` returns the `Done`;
`async for ev in client.stream(...)` yields `Token`s and finally the `Done`.

NPC memory (PROTOCOL.md §5.3) on both: `snapshot(conversation)` returns the save-game blob (`Snapshot`, bytes
with a `tokens` count), `restore(blob)` a `Restored`, `pin(...)` a `Pinned` whose `pin` `unpin` takes, `embed(texts)`
the vectors (`Embeddings`); the `BridgeClient` methods block like `stats` (other events stay queued for `poll`), and
a server error raises `BridgeError` with the server's code. `idle(ms)` reports a window the device is the engine's.

Neither needs torch: this module imports only pyzmq, msgpack and the protocol module.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from gllm.bridge import protocol as P

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
CLIENT_NAME = "gllm-python/0.1"


# ------------------------------------------------------------------------------------------ events
@dataclass
class Welcome:
    v: int
    model: str
    max_seq_len: int
    server: str
    lease_ms: int
    max_inflight: int
    max_message_bytes: int


@dataclass
class Token:
    """New text of one request (one item of a ``tokens`` message)."""
    id: str
    text: str
    n: int                                  # tokens this text came from
    step: int                               # the engine step
    logprobs: list[dict[str, Any]] | None = None


@dataclass
class Done:
    id: str
    finish_reason: str                      # "stop", "length", "cancelled" or "error"
    text: str                               # the whole completion
    usage: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Error:
    id: str | None                          # set when the error ends a request
    code: str
    message: str


@dataclass
class Pong:
    t: Any
    rtt_ms: float | None = None


@dataclass
class StatsReply:
    values: dict[str, Any]


class Snapshot(bytes):
    """A snapshot blob (opaque bytes for the save game) that also knows how many tokens of KV it holds."""
    tokens: int = 0

    def __new__(cls, blob: bytes, tokens: int = 0) -> "Snapshot":
        obj = super().__new__(cls, blob)
        obj.tokens = tokens
        return obj


@dataclass
class Restored:
    tokens: int                             # tokens of KV now in the server's prefix cache
    new_blocks: int                         # KV blocks the restore added (0: they were cached already)


@dataclass
class Pinned:
    pin: str                                # the pin's name, for unpin (the same prefix always gets the same name)
    tokens: int                             # tokens kept resident (whole KV blocks)


class Embeddings(list):
    """One unit-length vector (a list of floats) per input, in order; `prompt_tokens` is what they cost."""
    prompt_tokens: int = 0

    def __init__(self, vectors: list[list[float]], prompt_tokens: int = 0) -> None:
        super().__init__(vectors)
        self.prompt_tokens = prompt_tokens


@dataclass
class MemoryReply:
    """The reply to an NPC-memory op (snapshot, restore, pin, unpin, embed): `op` is the reply's op
    ("snapshot", "restored", "pinned", "unpinned", "embeddings"), `value` what the client's method returns."""
    id: str
    op: str
    value: Any


Event = Welcome | Token | Done | Error | Pong | StatsReply | MemoryReply

MEMORY_REPLIES = ("snapshot", "restored", "pinned", "unpinned", "embeddings")


class BridgeError(Exception):
    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def events_from_message(msg: Any) -> list[Event]:
    """Server message → events; unknown ops and malformed messages give none (forward compatible)."""
    if not isinstance(msg, dict):
        return []
    op = msg.get("op")
    try:
        if op == "tokens":
            step = msg.get("step", 0)
            return [Token(it["id"], it["text"], it["n"], step, it.get("logprobs")) for it in msg["items"]]
        if op == "done":
            return [Done(msg["id"], msg["finish_reason"], msg["text"], msg.get("usage") or {},
                         msg.get("timings") or {}, msg.get("error"))]
        if op == "error":
            return [Error(msg.get("id"), msg["code"], msg.get("message", ""))]
        if op == "pong":
            return [Pong(msg.get("t"))]
        if op == "stats":
            return [StatsReply({k: v for k, v in msg.items() if k != "op"})]
        if op in MEMORY_REPLIES:
            return [MemoryReply(msg["id"], op, _memory_value(op, msg))]
        if op == "welcome":
            return [Welcome(msg["v"], msg.get("model", ""), msg.get("max_seq_len", 0), msg.get("server", ""),
                            msg.get("lease_ms", 5000), msg.get("max_inflight", 0), msg.get("max_message_bytes", 0))]
    except (KeyError, TypeError, ValueError):
        pass
    return []


def _memory_value(op: str, msg: dict[str, Any]) -> Any:
    if op == "snapshot":
        if not isinstance(msg["blob"], (bytes, bytearray)):
            raise TypeError("snapshot.blob is not bin")
        return Snapshot(bytes(msg["blob"]), int(msg["tokens"]))
    if op == "restored":
        return Restored(int(msg["tokens"]), int(msg["new_blocks"]))
    if op == "pinned":
        return Pinned(str(msg["pin"]), int(msg["tokens"]))
    if op == "unpinned":
        return bool(msg["found"])
    return Embeddings([[float(x) for x in v] for v in msg["vectors"]], int(msg.get("prompt_tokens", 0)))


def _decode(frame: bytes) -> Any:
    try:
        import msgpack
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        return None


def _configure(sock: zmq.Socket, curve_server_key: bytes | None, curve_public_key: bytes | None,
               curve_secret_key: bytes | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10000)
    sock.setsockopt(zmq.RCVHWM, 0)           # never let libzmq drop the server's messages
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    if curve_server_key is not None:
        if curve_public_key is None or curve_secret_key is None:
            curve_public_key, curve_secret_key = zmq.curve_keypair()
        sock.curve_serverkey = curve_server_key
        sock.curve_publickey = curve_public_key
        sock.curve_secretkey = curve_secret_key


# ------------------------------------------------------------------------------------------ sync
class BridgeClient:
    """Non-blocking client for game loops. Not thread-safe: use it from one thread."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, name: str = CLIENT_NAME,
                 context: zmq.Context | None = None, curve_server_key: bytes | None = None,
                 curve_public_key: bytes | None = None, curve_secret_key: bytes | None = None) -> None:
        self.address, self.token, self.name = address, token, name
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        _configure(self.sock, curve_server_key, curve_public_key, curve_secret_key)
        self.sock.connect(address)
        self.welcome: Welcome | None = None
        self.in_flight: set[str] = set()
        self._pending: collections.deque[Event] = collections.deque()
        self._ids = itertools.count(1)
        self._last_send = time.monotonic()
        self._ping_times: dict[Any, float] = {}
        self._rehello_at = 0.0

    # -- session
    def connect(self, timeout_s: float = 10.0) -> Welcome:
        """Send hello and wait for welcome (the one blocking call: do it at load time)."""
        self._send(P.hello(self.name, self.token))
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no welcome from {self.address} in {timeout_s} s")
            for ev in self._receive(remaining * 1000, stop_at_first=True):
                if isinstance(ev, Welcome):
                    self.welcome = ev
                    return ev
                if isinstance(ev, Error) and ev.id is None and ev.code in (P.UNAUTHORIZED, P.BUSY, P.BAD_REQUEST):
                    raise BridgeError(ev.code, ev.message)
                self._pending.append(ev)

    def close(self) -> None:
        """Cancel what is in flight and close (waiting at most 50 ms to get the cancels out)."""
        for rid in list(self.in_flight):
            try:
                self.cancel(rid)
            except BridgeError:
                break
        self.sock.close(linger=50)

    def __enter__(self) -> "BridgeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests
    def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                 id: str | None = None, **params: Any) -> str:
        """Start a request; returns its id at once. Parameters: max_tokens, temperature, top_k, top_p, min_p,
        seed, stop, logprobs, priority, repetition_penalty, presence_penalty, frequency_penalty, ignore_eos,
        max_tokens_per_s, ttft_deadline_ms (see `gllm.request_fields`)."""
        rid = id if id is not None else f"r{next(self._ids)}"
        self._send(P.generate(rid, prompt=prompt, messages=messages, **params))
        self.in_flight.add(rid)
        return rid

    def cancel(self, id: str) -> None:
        """Ask to stop a request; its `Done` (finish_reason "cancelled", or whatever came first) still arrives."""
        self._send(P.cancel(id))

    def ping(self, t: Any = None) -> Any:
        """Send a ping; its `Pong` comes from `poll` with the round trip in `rtt_ms`. Returns the `t` sent."""
        if t is None:
            t = next(self._ids)
        self._ping_times[t] = time.monotonic()
        self._send(P.ping(t))
        return t

    def idle(self, ms: float) -> None:
        """The game will not need the device for the next `ms` milliseconds (its frame's work is done): sent once
        per frame, it makes the engine compute in those windows only (see `gllm.engine.compute_windows`)."""
        self._send(P.idle(ms))

    def frame(self, ms: float, target_ms: float | None = None, max_ms: float | None = None,
              frames: int | None = None, over: int | None = None) -> None:
        """Report the game's frame time (and its target; the longest frame, the frame count and the frames over
        1.1 x target since the previous report), for the engine's frame governor."""
        self._send(P.frame(ms, target_ms, max_ms, frames, over))

    def request_stats(self) -> None:
        """Ask for engine stats; a `StatsReply` comes from `poll`."""
        self._send(P.stats_request())

    # -- receiving
    def poll(self, max_ms: float = 0.0) -> list[Event]:
        """Every event that has arrived; waits up to `max_ms` for the first one, never longer."""
        self._keepalive()
        out = list(self._pending)
        self._pending.clear()
        if out:
            max_ms = 0.0
        out.extend(self._receive(max_ms))
        return out

    def wait(self, id: str, timeout_s: float = 60.0) -> Done:
        """Block until request `id` ends (other events stay queued for `poll`). Raises `BridgeError` on error."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, ev in enumerate(self._pending):
                if isinstance(ev, (Done, Error)) and ev.id == id:
                    del self._pending[i]
                    if isinstance(ev, Error):
                        raise BridgeError(ev.code, ev.message, ev.id)
                    return ev
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"request {id} did not end in {timeout_s} s")
            self._keepalive()
            self._pending.extend(self._receive(min(remaining * 1000, 100.0), stop_at_first=True))

    def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Blocking convenience: request stats and wait for them (other events stay queued for `poll`)."""
        self.request_stats()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for ev in self._receive((deadline - time.monotonic()) * 1000, stop_at_first=True):
                if isinstance(ev, StatsReply):
                    return ev.values
                self._pending.append(ev)
        raise TimeoutError(f"no stats in {timeout_s} s")

    # -- NPC memory (PROTOCOL.md §5.3): blocking conveniences like `stats`; other events stay queued for `poll`
    def snapshot(self, conversation: str | None = None, *, tokens: list[int] | None = None,
                 encoding: str | None = None, id: str | None = None, timeout_s: float = 60.0) -> Snapshot:
        """Export the KV cache of a conversation (the id of one of this client's generates that has ended) or of
        token ids, for the save game: an opaque blob (`bytes`) whose `tokens` says how many tokens it holds.
        `encoding` "int8" makes it about half the size. Raises `BridgeError` (e.g. `too_long` when the snapshot
        would exceed the server's max_message_bytes, `bad_request` for an unknown conversation)."""
        if (conversation is None) == (tokens is None):
            raise ValueError("give exactly one of conversation and tokens")
        rid = self._op_id(id)
        self._send(P.snapshot_request(rid, conversation=conversation, tokens=tokens, encoding=encoding))
        return self._wait_reply(rid, "snapshot", timeout_s)

    def restore(self, blob: bytes, *, id: str | None = None, timeout_s: float = 60.0) -> Restored:
        """Load a snapshot back into the server's prefix cache: the next generate whose prompt starts with its
        tokens skips their prefill. A blob of another model, or damaged in any byte, raises `BridgeError`
        (`bad_request`); one larger than the free KV, `too_long`."""
        rid = self._op_id(id)
        self._send(P.restore(rid, bytes(blob)))
        return self._wait_reply(rid, "restored", timeout_s)

    def pin(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
            tokens: list[int] | None = None, id: str | None = None, timeout_s: float = 60.0) -> Pinned:
        """Keep a prefix (a raw prompt, chat messages rendered without a generation prompt, or token ids)
        resident on the server, never evicted, until `unpin`; computed first if it is not cached."""
        if sum(x is not None for x in (prompt, messages, tokens)) != 1:
            raise ValueError("give exactly one of prompt, messages and tokens")
        rid = self._op_id(id)
        self._send(P.pin(rid, prompt=prompt, messages=messages, tokens=tokens))
        return self._wait_reply(rid, "pinned", timeout_s)

    def unpin(self, pin: str, *, id: str | None = None, timeout_s: float = 60.0) -> bool:
        """Let a pin's blocks be evicted again; returns whether the server had that pin."""
        rid = self._op_id(id)
        self._send(P.unpin(rid, pin))
        return self._wait_reply(rid, "unpinned", timeout_s)

    def embed(self, texts: str | list[str], *, pooling: str | None = None, id: str | None = None,
              timeout_s: float = 60.0) -> Embeddings:
        """One unit-length vector per text, in order (the model's final hidden states, pooled: "mean", the
        default, or "last"), for lore retrieval."""
        rid = self._op_id(id)
        self._send(P.embed(rid, texts if isinstance(texts, str) else list(texts), pooling))
        return self._wait_reply(rid, "embeddings", timeout_s)

    def _op_id(self, id: str | None) -> str:
        return id if id is not None else f"m{next(self._ids)}"

    def _wait_reply(self, id: str, op: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            for ev in self._receive(max(0.0, deadline - time.monotonic()) * 1000, stop_at_first=True):
                if isinstance(ev, MemoryReply) and ev.id == id and ev.op == op:
                    return ev.value
                if isinstance(ev, Error) and (ev.id == id or (ev.code == P.NO_SESSION and ev.id is None)):
                    raise BridgeError(ev.code, ev.message, id)
                self._pending.append(ev)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {op} reply to {id} in {timeout_s} s")
            self._keepalive()

    def _receive(self, max_ms: float, stop_at_first: bool = False) -> list[Event]:
        out: list[Event] = []
        deadline = time.monotonic() + max_ms / 1000.0
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                if out:
                    return out
                wait_ms = int((deadline - time.monotonic()) * 1000)  # whole ms: never past the deadline
                if wait_ms <= 0 or not self.sock.poll(wait_ms):
                    return out
                continue
            for ev in events_from_message(_decode(frame)):
                ev = self._note(ev)
                if ev is not None:
                    out.append(ev)
            if out and (stop_at_first or time.monotonic() >= deadline):
                return out

    def _note(self, ev: Event) -> Event | None:
        if isinstance(ev, (Done, Error)) and ev.id is not None:
            self.in_flight.discard(ev.id)
        if isinstance(ev, Pong):
            if ev.t is None:
                return None           # a keepalive
            sent = self._ping_times.pop(ev.t, None) if _hashable(ev.t) else None
            if sent is not None:
                ev.rtt_ms = (time.monotonic() - sent) * 1000.0
        if isinstance(ev, Welcome):
            self.welcome = ev
        if isinstance(ev, Error) and ev.code == P.NO_SESSION:
            self._session_lost(ev)
        return ev

    def _session_lost(self, ev: Error) -> None:
        # The server forgot us (lease expired, restarted): end what we had in flight, then say hello again.
        for rid in sorted(self.in_flight):
            self._pending.append(Error(rid, P.NO_SESSION, f"session lost: {ev.message}"))
        self.in_flight.clear()
        now = time.monotonic()
        if now >= self._rehello_at:
            self._rehello_at = now + 1.0
            self._send(P.hello(self.name, self.token))

    # -- sending
    def _send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.send(P.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            raise BridgeError(P.BUSY, "the send queue to the server is full (is the server running?)") from None
        self._last_send = time.monotonic()

    def _keepalive(self) -> None:
        lease_ms = self.welcome.lease_ms if self.welcome else 5000
        if time.monotonic() - self._last_send > lease_ms / 3000.0:
            self._send(P.ping(None))


def _hashable(x: Any) -> bool:
    try:
        hash(x)
        return True
    except TypeError:
        return False


# ------------------------------------------------------------------------------------------ asyncio
class AsyncBridgeClient:
    """asyncio client: one reader task dispatches events to the requests awaiting them."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str | None = None, name: str = CLIENT_NAME,
                 curve_server_key: bytes | None = None, curve_public_key: bytes | None = None,
                 curve_secret_key: bytes | None = None) -> None:
        import zmq.asyncio
        self.address, self.token, self.name = address, token, name
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        _configure(self.sock, curve_server_key, curve_public_key, curve_secret_key)
        self.sock.connect(address)
        self.welcome: Welcome | None = None
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._abandoned: set[str] = set()
        self._waiters: dict[str, collections.deque[asyncio.Future]] = collections.defaultdict(collections.deque)
        self._ops: dict[str, tuple[str, asyncio.Future]] = {}      # NPC-memory ops awaiting their reply
        self._ids = itertools.count(1)
        self._reader: asyncio.Task | None = None
        self._keeper: asyncio.Task | None = None
        self._last_send = time.monotonic()
        self._closed = False

    async def connect(self, timeout_s: float = 10.0) -> Welcome:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        fut = self._expect("welcome")
        await self._send(P.hello(self.name, self.token))
        self.welcome = await asyncio.wait_for(fut, timeout_s)
        if self._keeper is None:
            self._keeper = asyncio.get_running_loop().create_task(self._keepalive_loop())
        return self.welcome

    async def close(self) -> None:
        self._closed = True
        for rid in list(self._queues):
            try:
                await self._send(P.cancel(rid))
            except Exception:
                pass
        for task in (self._reader, self._keeper):
            if task is not None:
                task.cancel()
        self.sock.close(0)

    async def __aenter__(self) -> "AsyncBridgeClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                       id: str | None = None, **params: Any) -> Done:
        """Run one request to the end; cancelling the awaiting task cancels the request."""
        async for ev in self.stream(prompt, messages=messages, id=id, **params):
            if isinstance(ev, Done):
                return ev
        raise RuntimeError("stream ended without done")  # unreachable

    async def stream(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                     id: str | None = None, **params: Any) -> AsyncIterator[Token | Done]:
        """`Token`s as they arrive, then the `Done`. Raises `BridgeError` if the server refuses the request;
        leaving the loop early cancels the request."""
        rid = id if id is not None else f"a{next(self._ids)}"
        if rid in self._queues:
            raise ValueError(f"id {rid!r} is already in flight")
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[rid] = q
        finished = False
        try:
            await self._send(P.generate(rid, prompt=prompt, messages=messages, **params))
            while True:
                ev = await q.get()
                if isinstance(ev, Error):
                    finished = True
                    raise BridgeError(ev.code, ev.message, rid)
                finished = isinstance(ev, Done)
                yield ev
                if finished:
                    return
        finally:
            if finished:
                self._queues.pop(rid, None)
            elif not self._closed:
                self._abandoned.add(rid)
                try:
                    await self._send(P.cancel(rid))
                except Exception:
                    pass

    async def cancel(self, id: str) -> None:
        await self._send(P.cancel(id))

    async def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        fut = self._expect("stats")
        await self._send(P.stats_request())
        return (await asyncio.wait_for(fut, timeout_s)).values

    async def ping(self, timeout_s: float = 5.0) -> float:
        """Round trip to the server, in milliseconds."""
        t = next(self._ids)
        fut = self._expect(f"pong:{t}")
        start = time.monotonic()
        await self._send(P.ping(t))
        await asyncio.wait_for(fut, timeout_s)
        return (time.monotonic() - start) * 1000.0

    async def frame(self, ms: float, target_ms: float | None = None, max_ms: float | None = None,
                    frames: int | None = None, over: int | None = None) -> None:
        await self._send(P.frame(ms, target_ms, max_ms, frames, over))

    async def idle(self, ms: float) -> None:
        """The game will not need the device for the next `ms` milliseconds (see `BridgeClient.idle`)."""
        await self._send(P.idle(ms))

    # -- NPC memory (PROTOCOL.md §5.3): each awaits its one reply; a server error raises `BridgeError`
    async def snapshot(self, conversation: str | None = None, *, tokens: list[int] | None = None,
                       encoding: str | None = None, id: str | None = None, timeout_s: float = 60.0) -> Snapshot:
        """See `BridgeClient.snapshot`."""
        if (conversation is None) == (tokens is None):
            raise ValueError("give exactly one of conversation and tokens")
        return await self._call(id, lambda rid: P.snapshot_request(rid, conversation=conversation, tokens=tokens,
                                                                   encoding=encoding), "snapshot", timeout_s)

    async def restore(self, blob: bytes, *, id: str | None = None, timeout_s: float = 60.0) -> Restored:
        """See `BridgeClient.restore`."""
        return await self._call(id, lambda rid: P.restore(rid, bytes(blob)), "restored", timeout_s)

    async def pin(self, prompt: str | None = None, *, messages: list[dict[str, str]] | None = None,
                  tokens: list[int] | None = None, id: str | None = None, timeout_s: float = 60.0) -> Pinned:
        """See `BridgeClient.pin`."""
        if sum(x is not None for x in (prompt, messages, tokens)) != 1:
            raise ValueError("give exactly one of prompt, messages and tokens")
        return await self._call(id, lambda rid: P.pin(rid, prompt=prompt, messages=messages, tokens=tokens),
                                "pinned", timeout_s)

    async def unpin(self, pin: str, *, id: str | None = None, timeout_s: float = 60.0) -> bool:
        """See `BridgeClient.unpin`."""
        return await self._call(id, lambda rid: P.unpin(rid, pin), "unpinned", timeout_s)

    async def embed(self, texts: str | list[str], *, pooling: str | None = None, id: str | None = None,
                    timeout_s: float = 60.0) -> Embeddings:
        """See `BridgeClient.embed`."""
        return await self._call(id, lambda rid: P.embed(rid, texts if isinstance(texts, str) else list(texts),
                                                        pooling), "embeddings", timeout_s)

    async def _call(self, id: str | None, build: Any, op: str, timeout_s: float) -> Any:
        rid = id if id is not None else f"m{next(self._ids)}"
        if rid in self._ops or rid in self._queues:
            raise ValueError(f"id {rid!r} is already in flight")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ops[rid] = (op, fut)
        try:
            await self._send(build(rid))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._ops.pop(rid, None)

    # -- internals
    def _expect(self, key: str) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key].append(fut)
        return fut

    def _resolve(self, key: str, value: Any) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(value)
                return

    async def _send(self, msg: dict[str, Any]) -> None:
        await self.sock.send(P.encode(msg))
        self._last_send = time.monotonic()

    async def _keepalive_loop(self) -> None:
        while True:
            period = (self.welcome.lease_ms if self.welcome else 5000) / 3000.0
            await asyncio.sleep(period / 2)
            if time.monotonic() - self._last_send > period:
                await self._send(P.ping(None))

    async def _read_loop(self) -> None:
        while True:
            frame = await self.sock.recv()
            for ev in events_from_message(_decode(frame)):
                self._dispatch(ev)

    def _dispatch(self, ev: Event) -> None:
        op = self._ops.get(ev.id) if isinstance(ev, (MemoryReply, Error)) and ev.id is not None else None
        if op is not None:
            want, fut = op
            if not fut.done():
                if isinstance(ev, Error):
                    fut.set_exception(BridgeError(ev.code, ev.message, ev.id))
                elif ev.op == want:
                    fut.set_result(ev.value)
            return
        if isinstance(ev, (Token, Done)) or (isinstance(ev, Error) and ev.id is not None):
            if ev.id in self._abandoned:
                if not isinstance(ev, Token):
                    self._abandoned.discard(ev.id)
                    self._queues.pop(ev.id, None)
                return
            q = self._queues.get(ev.id)
            if q is not None:
                q.put_nowait(ev)
        elif isinstance(ev, Welcome):
            self.welcome = ev
            self._resolve("welcome", ev)
        elif isinstance(ev, StatsReply):
            self._resolve("stats", ev)
        elif isinstance(ev, Pong):
            if ev.t is not None:
                self._resolve(f"pong:{ev.t}", ev)
        elif isinstance(ev, Error):
            if ev.code == P.NO_SESSION:
                # the server forgot us (lease expired, restarted): fail what was in flight, say hello again
                for rid, q in list(self._queues.items()):
                    q.put_nowait(Error(rid, P.NO_SESSION, ev.message))
                for rid, (_, fut) in list(self._ops.items()):
                    if not fut.done():
                        fut.set_exception(BridgeError(P.NO_SESSION, ev.message, rid))
                if not self._closed:
                    asyncio.get_running_loop().create_task(self._send(P.hello(self.name, self.token)))
            elif ev.code in (P.UNAUTHORIZED, P.BUSY, P.BAD_REQUEST) and self._waiters.get("welcome"):
                # an error with no id while hello is pending: the hello was refused
                for fut in self._waiters.pop("welcome"):
                    if not fut.done():
                        fut.set_exception(BridgeError(ev.code, ev.message))

"""Fuzzing the bridge: over 10,000 hostile messages against a server subprocess, while a well-formed
stream runs beside them; plus hypothesis on the validators.

Every hostile message must be answered with exactly the expected reply (an `error` with the right code,
carrying the id when one was readable; a `pong`; nothing for messages that get no reply), in order; the
server must stay up, and the concurrent stream must produce exactly the text it produces undisturbed.
"""

from __future__ import annotations

import math
import random
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gllm.bridge import protocol as P
from gllm.bridge.client import BridgeClient, Done, Error, Token

from bridge_doubles import ServerProcess

N_MESSAGES = 10_500
MAX_BYTES = 65536
# The long request every duplicate id collides with asks for NEVER_ENDING tokens: no machine finishes it
# during the fuzz, so it is still in flight (and must be undisturbed) whatever the machine's speed.
NEVER_ENDING = 60_000
SERVER_ARGS = ["--max-seq-len", "65536", "--kv-cache-tokens", str(2 * 65536), "--max-batch-size", "4",
               "--cpu-threads", "1", "--max-inflight", "64", "--max-message-bytes", str(MAX_BYTES),
               "--dtype", "float32"]   # the stream is compared with its baseline across batch compositions

KINDS = {
    "generate": {"id": "id", "prompt": "str", "messages": "messages", "max_tokens": "int", "temperature": "float",
                 "top_k": "int", "top_p": "prob", "min_p": "float01", "seed": "int", "stop": "stop",
                 "logprobs": "int", "priority": "int", "repetition_penalty": "float", "presence_penalty": "pen",
                 "frequency_penalty": "pen", "ignore_eos": "bool"},
    "hello": {"v": "int", "client": "str", "token": "str"},
    "cancel": {"id": "id"},
    "frame": {"ms": "float", "target_ms": "float"},
}
BASE = {
    "generate": {"op": "generate", "id": "g", "prompt": "hi", "max_tokens": 4},
    "hello": {"op": "hello", "v": 1, "client": "fuzz"},
    "cancel": {"op": "cancel", "id": "nope"},
    "frame": {"op": "frame", "ms": 16.0, "target_ms": 16.6},
}


def wrong_values(kind: str, rnd: random.Random) -> list:
    """Values that are never valid for a field of this kind (nil is excluded: it means 'default')."""
    every = [True, False, 7, -3, 2.5, "text", b"\x00bin", [1, 2], {"k": "v"}, msgpack.ExtType(5, b"x"), 2**64 - 1]
    valid_types = {"id": (str,), "str": (str,), "messages": (), "int": (int,), "float": (int, float),
                   "prob": (int, float), "float01": (int, float), "pen": (int, float), "stop": (), "bool": (bool,)}
    out = [v for v in every if not (isinstance(v, valid_types[kind]) and not (isinstance(v, bool) and kind != "bool"))]
    if kind == "int":
        out += [-(2**63)]
    if kind in ("float", "prob", "float01", "pen"):
        out += [math.nan, math.inf, -math.inf, -1e300, 1e300]
    if kind == "prob":
        out += [0.0, 1.5, -0.5]
    if kind == "float01":
        out += [1.5, -0.1]
    if kind == "pen":
        out += [2.5, -3]
    if kind == "id":
        out += ["", "x" * 129]
    if kind == "messages":
        out += [[], [{"role": "user"}], [{"content": "x"}], [["user", "x"]], [{"role": 5, "content": "x"}],
                [{"role": "user", "content": 7}], [{"role": "", "content": "x"}]]
    if kind == "stop":
        out = [v for v in out if not isinstance(v, list)] + [[1], ["x"] * 17, [""], ["y" * 300], "a string"]
    return out


class Fuzzer:
    """Makes hostile messages and knows the reply each one must get."""

    def __init__(self, seed: int, live_dup: str) -> None:
        self.rnd = random.Random(seed)
        self.dup = live_dup
        self.counts: dict[str, int] = {}

    def _count(self, cat: str) -> None:
        self.counts[cat] = self.counts.get(cat, 0) + 1

    def expected(self, raw: bytes) -> tuple | None:
        """The reply the protocol rules give (cross-checked per category in `make`)."""
        try:
            m = P.parse_client_message(raw, MAX_BYTES)
        except P.ProtocolError as e:
            code = P.DUPLICATE_ID if e.request_id == self.dup else e.code
            return ("error", code, e.request_id)
        if isinstance(m, P.Ping):
            return ("pong", m.t)
        if isinstance(m, P.Hello):
            return ("welcome",)
        if isinstance(m, P.Generate):
            assert m.id == self.dup, "the fuzzer never starts a request by accident"
            return ("error", P.DUPLICATE_ID, m.id)
        if isinstance(m, P.Stats):
            return ("stats",)
        return None  # frame, cancel: no reply

    def make(self) -> tuple[list[bytes], tuple | None]:
        r = self.rnd
        roll = r.random()
        if roll < 0.18:
            self._count("random bytes")
            raw = bytes(r.getrandbits(8) for _ in range(r.randint(0, 40)))
            exp = self.expected(raw)
            assert exp is None or exp[0] in ("error", "pong", "stats", "welcome")
            if exp is not None and exp[0] == "error":
                assert exp[2] is None
            return [raw], exp
        if roll < 0.32:
            self._count("truncated")
            op = r.choice(list(BASE))
            full = P.encode({**BASE[op], "client": "x" * r.randint(0, 40)})
            raw = full[:r.randint(0, len(full) - 1)]
            exp = self.expected(raw)
            assert exp[:2] == ("error", P.BAD_REQUEST) and exp[2] is None
            return [raw], exp
        if roll < 0.62:
            self._count("wrong type")
            op = r.choice(list(KINDS))
            field = r.choice(list(KINDS[op]))
            value = r.choice(wrong_values(KINDS[op][field], r))
            msg = dict(BASE[op])
            msg["id" if op == "generate" else "_"] = f"w{r.randint(0, 10**6)}"
            if field == "messages":
                msg.pop("prompt")
            msg[field] = value
            raw = P.encode(msg)
            exp = self.expected(raw)
            want_id = msg.get("id") if op == "generate" and field != "id" else None
            assert exp == ("error", P.BAD_REQUEST, want_id), (msg, exp)
            return [raw], exp
        if roll < 0.72:
            self._count("unknown op")
            op = r.choice(["dance", "GENERATE", "", "hello ", "x" * 200, 5, None, [1], {"a": 1}, True, 1.5])
            raw = P.encode({"op": op, "id": "u1"})
            exp = self.expected(raw)
            assert exp[0] == "error" and exp[1] == (P.UNKNOWN_OP if isinstance(op, str) else P.BAD_REQUEST)
            return [raw], exp
        if roll < 0.80:
            self._count("negative / NaN")
            field = r.choice(["max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "logprobs", "priority",
                              "repetition_penalty", "presence_penalty"])
            if field in ("priority", "presence_penalty"):      # small negatives are valid there
                value = r.choice([-(2**63), math.nan, -math.inf, math.inf])
            else:
                value = r.choice([-1, -(2**63), math.nan, -math.inf, math.inf, -0.5, -1e-9])
            rid = f"n{r.randint(0, 10**6)}"
            raw = P.encode({"op": "generate", "id": rid, "prompt": "x", field: value})
            exp = self.expected(raw)
            assert exp == ("error", P.BAD_REQUEST, rid), (field, value, exp)
            return [raw], exp
        if roll < 0.81:
            self._count("huge")
            which = r.choice(["prompt", "client", "id", "nested"])
            if which == "prompt":
                raw = P.encode({"op": "generate", "id": "h", "prompt": "x" * (MAX_BYTES + 10)})
            elif which == "client":
                raw = P.encode({"op": "hello", "v": 1, "client": "c" * 60000})
            elif which == "id":
                raw = P.encode({"op": "generate", "id": "i" * 60000, "prompt": "x"})
            else:
                raw = b"\x91" * 50000 + b"\x80"
            exp = self.expected(raw)
            assert exp[0] == "error" and exp[1] in (P.TOO_LONG, P.BAD_REQUEST) and exp[2] is None
            return [raw], exp
        if roll < 0.87:
            self._count("duplicate id")
            msg = {"op": "generate", "id": self.dup, "prompt": "again", "max_tokens": 3}
            if r.random() < 0.5:
                msg["temperature"] = "hot"
            raw = P.encode(msg)
            exp = self.expected(raw)
            assert exp == ("error", P.DUPLICATE_ID, self.dup)
            return [raw], exp
        if roll < 0.89:
            self._count("multi-frame")
            return [P.encode(P.ping(1)), P.encode(P.ping(2))] + [b"x"] * r.randint(0, 2), ("error", P.BAD_REQUEST, None)
        if roll < 0.93:
            self._count("not a map")
            raw = P.encode(r.choice([1, -5, "generate", [1, 2], None, True, 2.5, [{"op": "ping"}]]))
            exp = self.expected(raw)
            assert exp == ("error", P.BAD_REQUEST, None)
            return [raw], exp
        self._count("valid")
        choice = r.random()
        if choice < 0.6:
            t = r.choice([None, 1, -7, "tick", [1, "a"], {"f": 2}, 2**40])
            raw = P.encode(P.ping(t))
        elif choice < 0.7:
            raw = P.encode(P.stats_request())
        elif choice < 0.85:
            raw = P.encode(P.frame(r.uniform(0, 50), 16.6))
        else:
            raw = P.encode(P.cancel(f"not-live-{r.randint(0, 99)}"))
        return [raw], self.expected(raw)


def _reply_key(m: dict) -> tuple:
    if m["op"] == "error":
        return ("error", m["code"], m["id"])
    if m["op"] == "pong":
        return ("pong", m["t"])
    return (m["op"],)


@pytest.fixture(scope="module")
def server(llama32_dir):
    with ServerProcess(llama32_dir, *SERVER_ARGS) as srv:
        yield srv


STREAM_PROMPT = "The innkeeper leaned over the counter and said"


def stream_once(endpoint: str) -> tuple[str, str, list[str]]:
    with BridgeClient(endpoint, name="bystander") as c:
        c.connect()
        c.generate(STREAM_PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
        parts: list[str] = []
        end = time.monotonic() + 120
        while True:
            assert time.monotonic() < end
            for ev in c.poll(10):
                if isinstance(ev, Token):
                    parts.append(ev.text)
                elif isinstance(ev, Done):
                    return ev.text, ev.finish_reason, parts
                elif isinstance(ev, Error):
                    raise AssertionError(f"the bystander got an error: {ev}")


def test_fuzz_10k_messages_with_a_concurrent_stream(server):
    baseline, reason, _ = stream_once(server.endpoint)
    assert reason == "length"

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(server.endpoint)
    sock.send(P.encode(P.hello("fuzzer")))
    assert sock.poll(10000)
    assert msgpack.unpackb(sock.recv())["op"] == "welcome"
    # a long request under the id that every duplicate reuses (it cannot end during the fuzz)
    sock.send(P.encode(P.generate("dup", prompt="Dup", max_tokens=NEVER_ENDING, ignore_eos=True, priority=-5)))

    stream_results: list = []
    stream_error: list = []

    fuzzing = threading.Event()
    fuzzing.set()

    def bystander() -> None:   # streams again and again for as long as the fuzz lasts
        try:
            while fuzzing.is_set():
                stream_results.append(stream_once(server.endpoint))
        except Exception as exc:  # reported below
            stream_error.append(exc)

    thread = threading.Thread(target=bystander, daemon=True)
    thread.start()

    fuzzer = Fuzzer(seed=20241122, live_dup="dup")
    expected: list[tuple] = []
    received: list[tuple] = []
    other: list[dict] = []
    sent = 0
    chunk = 400

    def read_replies(until: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while len(received) < until:
            if not sock.poll(max(1, int((end - time.monotonic()) * 1000))):
                raise AssertionError(f"missing replies: {len(received)} of {until}; last sent {sent}")
            m = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            if m["op"] in ("tokens", "done"):
                other.append(m)
            else:
                received.append(_reply_key(m))

    started = time.monotonic()
    while sent < N_MESSAGES or (len(stream_results) < 2 and not stream_error and time.monotonic() - started < 60):
        for _ in range(chunk):
            frames, exp = fuzzer.make()
            sock.send_multipart(frames)
            sent += 1
            if exp is not None:
                expected.append(exp)
        read_replies(len(expected), timeout=60)
    elapsed = time.monotonic() - started
    fuzzing.clear()
    assert received == expected
    assert sent >= 10_000 and len(expected) > 9_000
    assert all(n > 50 for n in fuzzer.counts.values()), fuzzer.counts

    # the long request was never disturbed by its duplicates: cancel it, it ends once, cancelled
    assert not any(m["op"] == "done" for m in other)
    sock.send(P.encode(P.cancel("dup")))
    end = time.monotonic() + 30
    while not any(m["op"] == "done" for m in other):
        assert sock.poll(int(max(1, (end - time.monotonic()) * 1000)))
        other.append(msgpack.unpackb(sock.recv(), raw=False))
    done = [m for m in other if m["op"] == "done"]
    assert len(done) == 1 and done[0]["id"] == "dup" and done[0]["finish_reason"] == "cancelled"
    text = "".join(it["text"] for m in other if m["op"] == "tokens" for it in m["items"])
    assert text == done[0]["text"]
    sock.close(0)
    ctx.term()

    thread.join(120)
    assert not stream_error, stream_error
    assert len(stream_results) >= 2
    for text, reason, parts in stream_results:
        assert (text, reason) == (baseline, "length") and "".join(parts) == text
    assert server.alive()
    print(f"\n{sent} fuzz messages in {elapsed:.2f} s beside {len(stream_results)} streams; {fuzzer.counts}")


# ------------------------------------------------------------------------------------------ hypothesis
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
field_names = st.sampled_from(sorted({f for k in KINDS.values() for f in k} | {"op", "t", "x"}))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=64))
def test_any_bytes_give_a_message_or_a_protocol_error(raw):
    try:
        P.parse_client_message(raw)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES
        P.encode(e.to_message())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(list(P.CLIENT_OPS) + ["nope"]),
       fields=st.dictionaries(field_names, msgpack_values, max_size=6))
@example(op="restore", fields={"id": "0"})     # a memory op's error carries its id, as a generate's does
@example(op="snapshot", fields={"id": "0"})
def test_any_map_gives_a_message_or_a_protocol_error(op, fields):
    raw = P.encode({**fields, "op": op})
    try:
        m = P.parse_client_message(raw)
    except P.ProtocolError as e:
        assert e.code in P.ERROR_CODES
        if e.request_id is not None:   # generate and the memory ops (PROTOCOL.md 5.3) answer errors with their id
            assert op in ("generate", "snapshot", "restore", "pin", "unpin", "embed")
            assert e.request_id == fields.get("id")
        P.encode(e.to_message())
        return
    assert type(m).__name__.lower() == op
    if isinstance(m, P.Generate):   # whatever passes validation is something the engine accepts
        from gllm.sampling import SamplingParams
        SamplingParams(max_new_tokens=m.max_tokens, temperature=m.temperature, top_k=m.top_k, top_p=m.top_p,
                       min_p=m.min_p, seed=m.seed, logprobs=m.logprobs, stop=tuple(m.stop),
                       repetition_penalty=m.repetition_penalty, presence_penalty=m.presence_penalty,
                       frequency_penalty=m.frequency_penalty)


# ------------------------------------------------------------------------------------------ READY properties
N_HANDSHAKES = 2_400
SOCKET_TYPES = ["DEALER", "REQ", "ROUTER", "PUB", "SUB", "PAIR", "PUSH", "STREAM", "", "dealer", "DEALER\x00",
                "X" * 255]


class HandshakeFuzzer:
    """Hostile READY commands: claimed identities (zero-prefixed, the ids libzmq generates, long, empty),
    socket types of every kind, unknown and malformed properties. A compatible one (DEALER, well formed)
    says hello and must get its welcome unless its identity is already held."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.counts: dict[str, int] = {}

    def identity(self) -> tuple[str, bytes]:
        r = self.rnd
        kind = r.choice(["empty", "zero5", "predicted", "random", "long", "zero1", "unicode"])
        value = {"empty": b"", "zero5": b"\x00" + r.randbytes(4), "zero1": b"\x00",
                 "predicted": b"\x00" + (0x6B8B4567 + r.randrange(64)).to_bytes(4, "big"),
                 "random": r.randbytes(r.randrange(1, 32)), "long": r.randbytes(255),
                 "unicode": "npc-ü".encode()}[kind]
        return kind, value

    def make(self) -> tuple[bytes, bool, bytes]:
        """(bytes to send, whether the server must welcome it, the claimed identity)."""
        from gllm.bridge import zmtp
        r = self.rnd
        shape = r.choice(["ok", "ok", "extra_props", "socket_type", "no_socket_type", "malformed", "dup_props"])
        self.counts[shape] = self.counts.get(shape, 0) + 1
        _, ident = self.identity()
        props = [("Socket-Type", b"DEALER"), ("Identity", ident)]
        ok = True
        if shape == "extra_props":
            props += [(r.choice(["X-Npc", "User-Id", "Resource", "a" * 255, "Identity2"]), r.randbytes(r.randrange(40)))
                      for _ in range(r.randrange(1, 4))]
            r.shuffle(props)
        elif shape == "socket_type":
            props[0] = ("Socket-Type", r.choice(SOCKET_TYPES[1:]).encode())
            ok = False
        elif shape == "no_socket_type":
            props = props[1:]
            ok = False
        elif shape == "dup_props":
            props.append(("Identity", r.randbytes(5)))
            ok = False                               # which claim wins is libzmq's business
        body = zmtp.encode_properties(props)
        if shape == "malformed":
            cut = r.randrange(len(body) + 1)
            body = body[:cut] + r.randbytes(r.randrange(6))
            ok = False
        return zmtp.GREETING_NULL + zmtp.encode_command("READY", body), ok, ident


def _hello_welcome(sock, deadline: float) -> bool:
    """On a raw connection whose handshake was sent: wait for the server's READY (a client never sends a
    message before it), say hello, and return True once the welcome arrives."""
    from gllm.bridge import zmtp
    reader, greeting = zmtp.FrameReader(), b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except OSError:
            return False
        if not chunk:
            return False
        if len(greeting) < 64:
            take = 64 - len(greeting)
            greeting, chunk = greeting + chunk[:take], chunk[take:]
        reader.feed(chunk)
        while (frame := reader.next()) is not None:
            flags, body = frame
            if flags & zmtp.FLAG_COMMAND and zmtp.parse_command(body)[0] == "READY":
                sock.sendall(zmtp.encode_frame(P.encode(P.hello("ready-fuzz"))))
            elif not flags & zmtp.FLAG_COMMAND:
                reply = msgpack.unpackb(body)
                assert reply["op"] == "welcome", reply
                return True
    return False


def test_fuzz_ready_properties_keep_the_server_serving(server):
    import socket as socketlib
    fuzzer = HandshakeFuzzer(seed=20261129)
    port = int(server.endpoint.rsplit(":", 1)[1])
    welcomed = refused = 0
    held: set[bytes] = set()    # a claimed id stays taken until libzmq has seen its connection close
    for _ in range(0, N_HANDSHAKES, 40):
        batch = []
        for _ in range(40):
            data, ok, ident = fuzzer.make()
            s = socketlib.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(data)
            must = ok and (ident == b"" or ident not in held)
            held.add(ident)
            batch.append((s, must, ident))
        deadline = time.monotonic() + 60
        for s, must, ident in batch:
            if must:
                assert _hello_welcome(s, deadline), f"a well-formed DEALER claiming {ident!r} got no welcome"
                welcomed += 1
            else:
                refused += 1
        for s, _, _ in batch:
            s.close()
        assert server.alive(), server.stderr()
    text, reason, _ = stream_once(server.endpoint)          # and an ordinary client is still served
    assert reason == "length" and text
    assert server.alive()
    assert welcomed > 450 and all(n > 200 for n in fuzzer.counts.values()), (welcomed, fuzzer.counts)
    print(f"\n{N_HANDSHAKES} READY variants: {welcomed} welcomed, {refused} refused or unchecked; {fuzzer.counts}")

"""bindings/PROTOCOL.md against the code and against libzmq: the document cannot drift.

- every msgpack vector: `msgpack` encodes the JSON value to exactly the hex, decodes the hex to the value,
  and the protocol module's builders / validators produce and accept the same bytes;
- every ZMTP vector: a raw TCP socket playing the ROUTER captures what a pyzmq DEALER really sends, and a
  raw TCP client sending the documented bytes gets through to a pyzmq ROUTER (and reads its real bytes);
- the validators: every field of every client message, with wrong types and out-of-range values.
No model, no server process: fast.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from gllm.bridge import protocol as P
from gllm.bridge import zmtp

DOC = Path(__file__).resolve().parent.parent / "bindings" / "PROTOCOL.md"
VECTOR_RE = re.compile(r"<!-- vector: ([\w-]+) -->\s*(?:```json\n(.*?)\n```\s*)?```hex\n(.*?)\n```", re.S)


def load_vectors() -> dict[str, tuple[object, bytes]]:
    out = {}
    for name, js, hx in VECTOR_RE.findall(DOC.read_text(encoding="utf-8")):
        assert name not in out, f"vector {name} appears twice"
        assert re.fullmatch(r"([0-9a-f]{2}[ \n])*[0-9a-f]{2}", hx), f"vector {name}: malformed hex"
        out[name] = (json.loads(js) if js else None, bytes.fromhex(hx.replace("\n", " ")))
    return out


VECTORS = load_vectors()
# NPC memory: the messages with a bin blob, whose JSON writes it as {"bin": HEX} (clients' runners skip these).
BIN_VECTOR_RE = re.compile(r"<!-- bin-vector: ([\w-]+) -->\s*```json\n(.*?)\n```\s*```hex\n(.*?)\n```", re.S)


def _with_bin(value):
    if isinstance(value, dict):
        if list(value) == ["bin"]:
            return bytes.fromhex(value["bin"])
        return {k: _with_bin(v) for k, v in value.items()}
    return [_with_bin(v) for v in value] if isinstance(value, list) else value


BIN_VECTORS = {name: (_with_bin(json.loads(js)), bytes.fromhex(hx.replace("\n", " ")))
               for name, js, hx in BIN_VECTOR_RE.findall(DOC.read_text(encoding="utf-8"))}
MSGPACK_VECTORS = sorted(k for k, (v, _) in VECTORS.items() if v is not None)
ZMTP_VECTORS = sorted(k for k, (v, _) in VECTORS.items() if v is None)


def vec(name: str) -> bytes:
    return VECTORS[name][1]


def test_document_has_every_vector():
    ops = {VECTORS[n][0]["op"] for n in MSGPACK_VECTORS} | {v["op"] for v, _ in BIN_VECTORS.values()}
    assert ops == set(P.CLIENT_OPS) | set(P.SERVER_OPS)
    assert set(BIN_VECTORS) == {"snapshot", "restore"}
    assert set(ZMTP_VECTORS) == {"zmtp-greeting", "zmtp-ready-dealer", "zmtp-ready-router", "zmtp-ping",
                                 "zmtp-pong", "zmtp-frame-ping", "zmtp-frame-long-header", "zmtp-client-opening",
                                 "zmtp-frame-hello"}
    # every error code of the code is documented in the table, and no other
    table = DOC.read_text(encoding="utf-8").split("## 6. Error codes", 1)[1].split("## 7.", 1)[0]
    assert set(re.findall(r"^\| `(\w+)` \|", table, re.M)) == set(P.ERROR_CODES)


# ------------------------------------------------------------------------------------------ msgpack
@pytest.mark.parametrize("name", MSGPACK_VECTORS)
def test_msgpack_vector(name):
    value, raw = VECTORS[name]
    assert msgpack.packb(value, use_bin_type=True) == raw
    assert P.encode(value) == raw
    assert msgpack.unpackb(raw, raw=False) == value
    assert list(msgpack.unpackb(raw, raw=False)) == list(value)   # key order too


def _built(name: str) -> dict:
    """The same message made by the protocol module's builders (what the server and client really send)."""
    v = VECTORS[name][0]
    if name.startswith("hello"):
        return P.hello(v["client"], v.get("token"))
    if name == "welcome":
        return P.welcome(v["model"], v["max_seq_len"], v["server"], lease_ms=v["lease_ms"],
                         max_inflight=v["max_inflight"], max_message_bytes=v["max_message_bytes"])
    if name.startswith("generate"):
        params = {k: x for k, x in v.items() if k not in ("op", "id", "prompt", "messages")}
        return P.generate(v["id"], prompt=v.get("prompt"), messages=v.get("messages"), **params)
    if name == "cancel":
        return P.cancel(v["id"])
    if name == "ping":
        return P.ping(v["t"])
    if name == "pong":
        return P.pong(v["t"])
    if name == "frame":
        return P.frame(v["ms"], v["target_ms"], v["max_ms"], v["frames"], v["over"])
    if name == "idle":
        return P.idle(v["ms"])
    if name == "stats-request":
        return P.stats_request()
    if name == "stats":
        shuffled = dict(reversed([(k, x) for k, x in v.items() if k != "op"]))
        return P.stats(shuffled)
    if name.startswith("tokens"):
        items = []
        for it in v["items"]:
            lps = None
            if "logprobs" in it:
                lps = [P.logprob_entry(e["token"], e["logprob"], [tuple(t) for t in e["top"]]) for e in it["logprobs"]]
            items.append(P.token_item(it["id"], it["text"], it["n"], lps))
        return P.tokens(v["step"], items)
    if name.startswith("done"):
        return P.done(v["id"], v["finish_reason"], v["text"], v["usage"]["prompt_tokens"],
                      v["usage"]["completion_tokens"], v["timings"]["ttft_ms"], v["timings"]["total_ms"],
                      cached_tokens=v["usage"]["cached_tokens"])
    if name.startswith("error"):
        return P.error(v["id"], v["code"], v["message"])
    # NPC memory
    if name == "snapshot-request":
        return P.snapshot_request(v["id"], conversation=v.get("conversation"), tokens=v.get("tokens"),
                                  encoding=v.get("encoding"))
    if name == "restored":
        return P.restored(v["id"], v["tokens"], v["new_blocks"])
    if name == "pin":
        return P.pin(v["id"], prompt=v.get("prompt"), messages=v.get("messages"), tokens=v.get("tokens"))
    if name == "pinned":
        return P.pinned(v["id"], v["pin"], v["tokens"])
    if name == "unpin":
        return P.unpin(v["id"], v["pin"])
    if name == "unpinned":
        return P.unpinned(v["id"], v["pin"], v["found"])
    if name == "embed":
        return P.embed(v["id"], v["input"], v.get("pooling"))
    if name == "embeddings":
        return P.embeddings(v["id"], v["vectors"], v["prompt_tokens"])
    raise AssertionError(f"no builder for vector {name}")


@pytest.mark.parametrize("name", MSGPACK_VECTORS)
def test_builders_produce_the_vectors(name):
    assert P.encode(_built(name)) == vec(name)


@pytest.mark.parametrize("name", [n for n in MSGPACK_VECTORS if VECTORS[n][0]["op"] in P.CLIENT_OPS
                                  and n not in ("stats",)])
def test_client_vectors_validate(name):
    msg = P.parse_client_message(vec(name))
    assert type(msg).__name__.lower() == VECTORS[name][0]["op"]


def test_bin_vectors_of_the_npc_memory_messages():
    restore, raw = BIN_VECTORS["restore"]
    assert P.encode(P.restore(restore["id"], restore["blob"])) == raw == msgpack.packb(restore, use_bin_type=True)
    parsed = P.parse_client_message(raw)
    assert isinstance(parsed, P.Restore) and parsed.blob == restore["blob"] and raw.count(b"\xc4") == 1
    snap, raw = BIN_VECTORS["snapshot"]
    assert P.encode(P.snapshot(snap["id"], snap["tokens"], snap["blob"])) == raw
    assert msgpack.unpackb(raw, raw=False) == snap


@pytest.mark.parametrize("msg, complaint", [
    ({"op": "snapshot", "id": "s"}, "exactly one of conversation or tokens"),
    ({"op": "snapshot", "id": "s", "conversation": "c", "tokens": [1]}, "exactly one"),
    ({"op": "snapshot", "id": "s", "tokens": [-1]}, "tokens must be"),
    ({"op": "snapshot", "id": "s", "tokens": [True]}, "tokens must be"),
    ({"op": "snapshot", "id": "s", "conversation": "c", "encoding": "fp4"}, "encoding must be one of"),
    ({"op": "restore", "id": "r", "blob": "text"}, "blob must be non-empty bin"),
    ({"op": "restore", "id": "r", "blob": b""}, "blob must be non-empty bin"),
    ({"op": "restore", "id": "r"}, "blob must be"),
    ({"op": "pin", "id": "p"}, "exactly one of prompt, messages or tokens"),
    ({"op": "pin", "id": "p", "prompt": "a", "tokens": [1]}, "exactly one"),
    ({"op": "pin", "id": "p", "messages": [{"role": "system"}]}, "content must be a string"),
    ({"op": "unpin", "id": "u"}, r"pin \(the id"),
    ({"op": "embed", "id": "e", "input": []}, "input must be"),
    ({"op": "embed", "id": "e", "input": ["a", 3]}, "input must be"),
    ({"op": "embed", "id": "e", "input": ["x"] * 257}, "input must be"),
    ({"op": "embed", "id": "e", "input": "x", "pooling": "max"}, "pooling must be one of"),
])
def test_npc_memory_messages_are_validated(msg, complaint):
    with pytest.raises(P.ProtocolError, match=complaint) as info:
        P.parse_client_message(P.encode(msg))
    assert info.value.code == P.BAD_REQUEST and info.value.request_id == msg["id"]


def test_generate_vector_fields():
    g = P.parse_client_message(vec("generate-messages"))
    assert (g.id, g.max_tokens, g.temperature, g.top_k, g.top_p, g.min_p, g.seed, g.stop, g.logprobs, g.priority) == \
        ("npc7", 64, 0.7, 40, 0.95, 0.05, 1234, ["\n"], 2, -1)
    assert g.messages[0] == {"role": "system", "content": "You are Brann, a tired town guard of Eldmoor."}
    d = P.parse_client_message(P.encode({"op": "generate", "id": "x", "prompt": "hi"}))
    for name, default in P.GENERATE_DEFAULTS.items():
        assert getattr(d, name if name != "max_tokens" else "max_tokens") == default, name


def test_structured_output_vectors_and_json_schema_as_map_or_text():
    g = P.parse_client_message(vec("generate-json-schema"))
    schema = {"type": "object", "properties": {"action": {"enum": ["open_gate", "wait"]}}, "required": ["action"]}
    assert json.loads(g.json_schema) == schema and (g.regex, g.grammar, g.choice) == (None, None, [])
    as_map = P.parse_client_message(P.encode({**GOOD, "json_schema": schema}))
    assert as_map.json_schema == g.json_schema                         # one canonical text either way
    assert P.parse_client_message(vec("generate-choice")).choice == ["yes", "no"]
    e = _err({**GOOD, "regex": "a", "choice": ["a"]})                   # at most one constraint
    assert (e.code, e.request_id) == (P.BAD_REQUEST, "r1") and e.message.startswith("choice cannot be combined")


def test_every_optional_field_needs_map16():
    params = {"max_tokens": 8, "temperature": 0.5, "top_k": 3, "top_p": 0.9, "min_p": 0.1, "seed": 1, "stop": ["x"],
              "logprobs": 1, "priority": 2, "repetition_penalty": 1.1, "presence_penalty": 0.1,
              "frequency_penalty": 0.1, "ignore_eos": True}
    raw = P.encode(P.generate("id", prompt="p", **params))
    assert raw[:3] == bytes.fromhex("de0010")
    assert P.parse_client_message(raw).ignore_eos is True


# ------------------------------------------------------------------------------------------ validation
def _err(msg, raw: bool = False) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.parse_client_message(msg if raw else P.encode(msg))
    return info.value


GOOD = {"op": "generate", "id": "r1", "prompt": "hello"}
WRONG_TYPES = [True, 1, -1, 1.5, "s", b"b", [1], {"a": 1}]
FIELD_TYPES = {  # field -> the values (of WRONG_TYPES or beyond) that are fine
    "max_tokens": (1,), "temperature": (1, 1.5), "top_k": (1,), "top_p": (1, ), "min_p": (1,), "seed": (1,),
    "stop": ([],), "logprobs": (1,), "priority": (1, -1), "repetition_penalty": (1, 1.5),
    "presence_penalty": (1, -1, 1.5), "frequency_penalty": (1, -1, 1.5), "ignore_eos": (True,),
    "json_schema": ({"a": 1},), "regex": ("s",), "grammar": ("s",), "choice": ([],),
}


@pytest.mark.parametrize("field", sorted(FIELD_TYPES))
def test_every_generate_field_rejects_wrong_types(field):
    for value in WRONG_TYPES:
        if any(value == ok and type(value) is type(ok) for ok in FIELD_TYPES[field]):
            continue
        e = _err({**GOOD, field: value})
        assert e.code == P.BAD_REQUEST and field in e.message and e.request_id == "r1", (field, value, e.message)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2**31), ("temperature", -0.1), ("temperature", math.nan),
    ("temperature", math.inf), ("temperature", -math.inf), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.01),
    ("top_p", math.nan), ("min_p", -0.01), ("min_p", 2.0), ("seed", -1), ("seed", 2**64 - 1 + 0), ("logprobs", 21),
    ("logprobs", -1), ("priority", 2**31), ("priority", -(2**31) - 1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("stop", ["x"] * 17), ("stop", [""]),
    ("stop", ["x" * 257]), ("stop", [1]), ("stop", "x"), ("temperature", 2**64 - 1), ("temperature", -(2**63)),
    ("json_schema", "[1]"), ("json_schema", "{oops"), ("json_schema", {"a": "x" * 70000}), ("json_schema", {"a": b"x"}),
    ("regex", ""), ("regex", "x" * 4097), ("grammar", ""), ("choice", [""]), ("choice", ["x"] * 257),
    ("choice", "yes"),
])
def test_out_of_range_values(field, value):
    if field == "seed" and value == 2**64 - 1:
        assert P.parse_client_message(P.encode({**GOOD, field: value})).seed == value   # the top of the range is fine
        return
    e = _err({**GOOD, field: value})
    assert e.code == P.BAD_REQUEST and field in e.message and e.request_id == "r1"


@pytest.mark.parametrize("msg,code,rid", [
    ({"op": "generate", "prompt": "x"}, P.BAD_REQUEST, None),
    ({"op": "generate", "id": "", "prompt": "x"}, P.BAD_REQUEST, None),
    ({"op": "generate", "id": "x" * 129, "prompt": "x"}, P.BAD_REQUEST, None),
    ({"op": "generate", "id": 7, "prompt": "x"}, P.BAD_REQUEST, None),
    ({"op": "generate", "id": "a"}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "prompt": 5}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": []}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": "hi"}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": [["user", "hi"]]}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": [{"role": "user"}]}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": [{"role": 1, "content": "x"}]}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": [{"role": "", "content": "x"}]}, P.BAD_REQUEST, "a"),
    ({"op": "generate", "id": "a", "messages": [{"role": "user", "content": None}]}, P.BAD_REQUEST, "a"),
    ({"op": "hello"}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": 0}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": "1"}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": True}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": 1, "client": 5}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": 1, "token": 5}, P.BAD_REQUEST, None),
    ({"op": "hello", "v": 1, "token": "x" * 1025}, P.BAD_REQUEST, None),
    ({"op": "cancel"}, P.BAD_REQUEST, None),
    ({"op": "cancel", "id": 3}, P.BAD_REQUEST, None),
    ({"op": "frame"}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": -1.0}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": math.nan}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": 16.0, "target_ms": "16"}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": 16.0, "frames": 4, "over": 5}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": 16.0, "frames": -1}, P.BAD_REQUEST, None),
    ({"op": "idle"}, P.BAD_REQUEST, None),
    ({"op": "idle", "ms": -0.5}, P.BAD_REQUEST, None),
    ({"op": "idle", "ms": "2"}, P.BAD_REQUEST, None),
    ({"op": "idle", "ms": math.inf}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": 16.0, "over": 1.5}, P.BAD_REQUEST, None),
    ({"op": "frame", "ms": 16.0, "max_ms": -2.0}, P.BAD_REQUEST, None),
    ({"op": "nope"}, P.UNKNOWN_OP, None),
    ({"op": "GENERATE", "id": "a", "prompt": "x"}, P.UNKNOWN_OP, None),
    ({"op": 1}, P.BAD_REQUEST, None),
    ({"op": None}, P.BAD_REQUEST, None),
    ({"id": "a"}, P.BAD_REQUEST, None),
    ({1: "generate"}, P.BAD_REQUEST, None),
])
def test_bad_messages(msg, code, rid):
    e = _err(msg)
    assert (e.code, e.request_id) == (code, rid), e.message
    assert P.encode(e.to_message())  # always encodable


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x81", b"\x81\xa2op", b"\xa5hello", b"\x93\x01\x02\x03",
                                 b"\x81\xa2op\xa4ping\x00", b"\xd9\x02\xff\xfe", b"\x91" * 100000, b"\x00",
                                 bytes(range(256)), b"\xc4\x03abc", b"\xd4\x01\x00", b"\xc0", b"\xc3"])
def test_undecodable_frames(raw):
    e = _err(raw, raw=True)
    assert e.code == P.BAD_REQUEST and e.request_id is None


def test_too_large_frame():
    with pytest.raises(P.ProtocolError) as info:
        P.parse_client_message(P.encode({**GOOD, "prompt": "x" * 2000}), max_message_bytes=1000)
    assert info.value.code == P.TOO_LONG


def test_nil_means_default_and_unknown_keys_are_ignored():
    g = P.parse_client_message(P.encode({**GOOD, "seed": None, "temperature": None, "stop": None, "future": [1, 2]}))
    assert (g.seed, g.temperature, g.stop) == (None, 1.0, [])
    assert P.parse_client_message(P.encode({"op": "ping"})).t is None
    assert P.parse_client_message(P.encode({"op": "hello", "v": 7})).v == 7   # a newer client: the server answers v1


def test_float32_and_int_in_float_fields():
    raw = msgpack.packb({**GOOD, "temperature": 0.5}, use_single_float=True)
    assert b"\xca\x3f\x00\x00\x00" in raw
    assert P.parse_client_message(raw).temperature == 0.5
    assert P.parse_client_message(P.encode({**GOOD, "top_p": 1})).top_p == 1.0
    # any key order, any int width
    raw = b"\x83\xa2id\xa1a\xaamax_tokens\xcf" + (5).to_bytes(8, "big") + b"\xa2op\xa8generate"
    raw = raw[:1] + raw[1:]
    g = P.parse_client_message(b"\x84" + raw[1:] + b"\xa6prompt\xa1x")
    assert (g.id, g.max_tokens, g.prompt) == ("a", 5, "x")


# ------------------------------------------------------------------------------------------ ZMTP
def _recv_for(sock: socket.socket, seconds: float, want: int | None = None) -> bytes:
    sock.settimeout(0.05)
    buf, end = b"", time.monotonic() + seconds
    while time.monotonic() < end and (want is None or len(buf) < want):
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def test_vector_constants_match_the_reference_implementation():
    assert zmtp.GREETING_NULL == vec("zmtp-greeting")
    assert zmtp.ready_command("DEALER") == vec("zmtp-ready-dealer")
    assert zmtp.ready_command("ROUTER") == vec("zmtp-ready-router")
    assert zmtp.encode_command("PONG") == vec("zmtp-pong")
    assert zmtp.encode_command("PING", b"\0\0") == vec("zmtp-ping")
    assert zmtp.encode_frame(vec("ping")) == vec("zmtp-frame-ping")
    assert zmtp.encode_frame(b"x" * 300)[:9] == vec("zmtp-frame-long-header")
    assert zmtp.encode_frame(b"x" * 255)[:2] == b"\x00\xff"
    assert vec("zmtp-client-opening") == vec("zmtp-greeting") + vec("zmtp-ready-dealer")
    assert vec("zmtp-frame-hello") == zmtp.encode_frame(vec("hello"))


def test_pyzmq_dealer_sends_the_documented_bytes(ctx):
    """A raw TCP listener plays the ROUTER and records every byte libzmq's DEALER writes."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{lsock.getsockname()[1]}")
    dealer.send(vec("hello"))                                 # queued until the handshake is done
    conn, _ = lsock.accept()
    try:
        first = _recv_for(conn, 2.0, want=10)
        assert first == vec("zmtp-greeting")[:10]             # libzmq waits for our signature before going on
        conn.sendall(vec("zmtp-greeting") + vec("zmtp-ready-router"))
        want = vec("zmtp-client-opening") + vec("zmtp-frame-hello")
        got = first + _recv_for(conn, 2.0, want=len(want) - 10)
        assert got == want
        dealer.send(vec("ping"))
        assert _recv_for(conn, 2.0, want=len(vec("zmtp-frame-ping"))) == vec("zmtp-frame-ping")
        body = b"\xc0" * 300
        dealer.send(body)
        assert _recv_for(conn, 2.0, want=309) == vec("zmtp-frame-long-header") + body
        # a PING from "the server" is answered with the documented PONG
        conn.sendall(vec("zmtp-ping"))
        assert _recv_for(conn, 2.0, want=len(vec("zmtp-pong"))) == vec("zmtp-pong")
        # and what the DEALER receives in the documented framing arrives as the message
        conn.sendall(vec("zmtp-frame-ping") + zmtp.encode_frame(vec("welcome")))
        assert dealer.poll(2000) and dealer.recv() == vec("ping")
        assert dealer.recv() == vec("welcome")
    finally:
        conn.close()
        lsock.close()
        dealer.close(0)


def test_documented_bytes_get_through_to_a_pyzmq_router(ctx):
    """A raw TCP client writes the documented opening and reads libzmq ROUTER's real bytes."""
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.HEARTBEAT_IVL, 200)
    router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)   # (the default timeout is the interval)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    c = socket.create_connection(("127.0.0.1", port))
    try:
        c.sendall(vec("zmtp-client-opening"))
        got = _recv_for(c, 2.0, want=64 + len(vec("zmtp-ready-router")))
        assert got == vec("zmtp-greeting") + vec("zmtp-ready-router")
        c.sendall(vec("zmtp-frame-hello"))               # only after the server's READY (PROTOCOL.md §2.3)
        assert router.poll(2000)
        ident, body = router.recv_multipart()
        assert body == vec("hello") and msgpack.unpackb(body) == VECTORS["hello"][0]
        router.send_multipart([ident, vec("welcome")])
        router.send_multipart([ident, b"\x90" * 300])
        want = zmtp.encode_frame(vec("welcome")) + vec("zmtp-frame-long-header") + b"\x90" * 300
        got = _recv_for(c, 2.0, want=len(want) + 9)   # maybe with a PING in between
        frames = zmtp.FrameReader()
        frames.feed(got)
        seen = []
        while (f := frames.next()) is not None:
            seen.append(f)
        messages = [b for fl, b in seen if not fl & zmtp.FLAG_COMMAND]
        assert messages == [vec("welcome"), b"\x90" * 300]
        assert got.replace(vec("zmtp-ping"), b"") == want
        # heartbeats: the ROUTER's PING is the documented one; our PONG keeps the connection up
        ping = _recv_for(c, 1.5, want=len(vec("zmtp-ping")))
        assert ping.startswith(vec("zmtp-ping"))
        c.sendall(vec("zmtp-pong") + vec("zmtp-frame-ping"))
        assert router.poll(2000)
        assert router.recv_multipart() == [ident, vec("ping")]
    finally:
        c.close()
        router.close(0)


def test_reference_dealer_round_trip(ctx):
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    d = zmtp.ZmtpDealer("127.0.0.1", port)
    try:
        assert d.peer_properties == {"Socket-Type": b"ROUTER", "Identity": b""}
        for size in (0, 1, 255, 256, 70000):
            body = bytes([size % 251]) * size
            d.send(body)
            ident, got = router.recv_multipart()
            assert got == body
            router.send_multipart([ident, body[::-1]])
            assert d.recv(2.0) == body[::-1]
    finally:
        d.close()
        router.close(0)

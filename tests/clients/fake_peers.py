"""Scripted ZMTP peers for what the real server never does: a CURVE greeting, an ERROR command, silence, and
a server that splits its messages into MORE parts, uses long frames for short bodies, sends PINGs with a context,
unknown commands, unknown ops and unknown keys. Raw TCP, byte for byte as PROTOCOL.md §2 describes; one thread
per connection. The scripted peer also checks the client: it records whether a message frame arrived before its
READY and whether the PONG echoed the PING's context, and reports both in its answer to `stats`."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable

import msgpack

NULL_GREETING = bytes([0xFF, 0, 0, 0, 0, 0, 0, 0, 1, 0x7F, 3, 1]) + b"NULL".ljust(20, b"\0") + b"\0" * 32
CURVE_GREETING = NULL_GREETING[:12] + b"CURVE".ljust(20, b"\0") + b"\0" * 32
READY_ROUTER = bytes.fromhex("04 29 05 52 45 41 44 59 0b 53 6f 63 6b 65 74 2d 54 79 70 65 00 00 00 06 52 4f 55 54"
                             " 45 52 08 49 64 65 6e 74 69 74 79 00 00 00 00")


def frame(body: bytes, flags: int = 0, long: bool = False) -> bytes:
    if long or len(body) > 255:
        return bytes([flags | 0x02]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def command(name: str, data: bytes = b"") -> bytes:
    return frame(bytes([len(name)]) + name.encode() + data, flags=0x04)


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def read(self, n: int, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def frame(self, timeout: float = 10.0) -> tuple[int, bytes]:
        flags = self.read(1, timeout)[0]
        size = int.from_bytes(self.read(8 if flags & 0x02 else 1, timeout), "big")
        return flags, self.read(size, timeout)

    def pending(self) -> bool:
        """Whether bytes are already waiting (without blocking)."""
        if self.buf:
            return True
        self.sock.settimeout(0.0)
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            return False
        if chunk:
            self.buf += chunk
            return True
        return False


def _curve(conn: _Conn) -> None:
    conn.sock.sendall(CURVE_GREETING)
    conn.read(1 << 20, timeout=30)   # until the client hangs up


def _error(conn: _Conn) -> None:
    conn.sock.sendall(NULL_GREETING + command("ERROR", bytes([8]) + b"no entry"))
    conn.read(1 << 20, timeout=30)


def _silent(conn: _Conn) -> None:
    conn.read(1 << 20, timeout=30)


def _scripted(conn: _Conn) -> None:
    conn.sock.sendall(NULL_GREETING)
    conn.read(64)                                   # the client's greeting
    flags, body = conn.frame()                      # its READY
    assert flags & 0x04 and body[1:6] == b"READY", (flags, body[:8])
    time.sleep(0.2)                                 # a client that sends hello before our READY is caught here
    early = conn.pending()
    conn.sock.sendall(READY_ROUTER)
    flags, body = conn.frame()
    hello = msgpack.unpackb(body)
    assert hello["op"] == "hello", hello
    welcome = msgpack.packb({"op": "welcome", "v": 1, "model": "fake", "max_seq_len": 64, "server": "fake/1",
                             "lease_ms": 60000, "max_inflight": 4, "max_message_bytes": 65536, "future": [1, {"a": 2}]})
    ping_ctx = b"ctx1"
    conn.sock.sendall(command("PING", b"\x00\x00" + ping_ctx) + command("XYZZY", b"\x01\x02")
                      + frame(welcome[:10], flags=0x01) + frame(welcome[10:])
                      + frame(msgpack.packb({"op": "gossip", "x": 1})))
    pong_ok = False
    gen = None
    while gen is None or not pong_ok:
        flags, body = conn.frame()
        if flags & 0x04:
            if body[:5] == b"\x04PONG":
                pong_ok = body[5:] == ping_ctx
            continue
        msg = msgpack.unpackb(body)
        if msg.get("op") == "generate":
            gen = msg
    rid = gen["id"]
    # Another op's reply carrying the generate's id (a confused or hostile server): it must not end the generate.
    conn.sock.sendall(frame(msgpack.packb({"op": "restored", "id": rid, "conversation": "c", "tokens": 3})))
    done = msgpack.packb({"op": "done", "id": rid, "finish_reason": "stop", "text": "Hello", "extra": {"k": [1, 2]},
                          "usage": {"prompt_tokens": 5, "completion_tokens": 2, "cached_tokens": 3},
                          "timings": {"ttft_ms": None, "total_ms": 1.5}})
    conn.sock.sendall(
        frame(msgpack.packb({"op": "tokens", "step": 1, "items": [{"id": rid, "text": "Hel", "n": 1}]}), long=True)
        + frame(msgpack.packb({"op": "tokens", "step": 2, "items": [
            {"id": "not-mine", "text": "zzz", "n": 1}, {"id": rid, "text": "lo", "n": 1, "future_field": [1, 2]}]}))
        + frame(done[:7], flags=0x01) + frame(done[7:20], flags=0x01) + frame(done[20:]))
    while True:
        flags, body = conn.frame(timeout=30)
        if flags & 0x04:
            continue
        msg = msgpack.unpackb(body)
        if msg.get("op") == "stats":
            stats = {"op": "stats", "pong_ok": int(pong_ok), "hello_before_ready": int(early),
                     "client": hello.get("client", "")}
            conn.sock.sendall(frame(msgpack.packb(stats)))


BEHAVIOURS: dict[str, Callable[[_Conn], None]] = {"curve": _curve, "error": _error, "silent": _silent,
                                                  "scripted": _scripted}


class FakePeers:
    """Listens on one loopback port per behaviour; `ports` maps behaviour -> port. `errors` collects what went
    wrong inside the scripted peer (an assertion about the client's bytes)."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self.errors: list[str] = []
        self._socks: list[socket.socket] = []
        self._stop = False
        for name, fn in BEHAVIOURS.items():
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            self._socks.append(s)
            self.ports[name] = s.getsockname()[1]
            threading.Thread(target=self._accept, args=(s, name, fn), daemon=True).start()

    def _accept(self, listener: socket.socket, name: str, fn: Callable[[_Conn], None]) -> None:
        while not self._stop:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, name, fn), daemon=True).start()

    def _serve(self, sock: socket.socket, name: str, fn: Callable[[_Conn], None]) -> None:
        try:
            fn(_Conn(sock))
        except (ConnectionError, OSError):
            pass
        except Exception as exc:   # the client broke the script
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            sock.close()

    def close(self) -> None:
        self._stop = True
        for s in self._socks:
            s.close()

"""A minimal ZMTP 3.1 DEALER over a plain TCP socket: the algorithm a game client implements.

No libzmq: this is the reference for the C#, GDScript and C++ clients (bindings/PROTOCOL.md
describes the same bytes), and the tests use it to prove that the documented bytes really get
through to the server. NULL security mechanism only.
"""

from __future__ import annotations

import socket
import struct
import time

SIGNATURE = bytes.fromhex("ff00000000000000017f")
GREETING_NULL = SIGNATURE + bytes([3, 1]) + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31   # 64 bytes

FLAG_MORE = 0x01
FLAG_LONG = 0x02
FLAG_COMMAND = 0x04


class ZmtpError(Exception):
    pass


def encode_frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    """One ZMTP frame: flags, then a 1-byte size (bodies up to 255 bytes) or an 8-byte big-endian size."""
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    if len(body) <= 255:
        return bytes([flags, len(body)]) + body
    return bytes([flags | FLAG_LONG]) + struct.pack(">Q", len(body)) + body


def encode_command(name: str, data: bytes = b"") -> bytes:
    raw = name.encode("ascii")
    return encode_frame(bytes([len(raw)]) + raw + data, command=True)


def encode_properties(props: list[tuple[str, bytes]]) -> bytes:
    out = b""
    for name, value in props:
        raw = name.encode("ascii")
        out += bytes([len(raw)]) + raw + struct.pack(">I", len(value)) + value
    return out


def ready_command(socket_type: str = "DEALER", identity: bytes = b"") -> bytes:
    """The READY command libzmq sends for the NULL mechanism: Socket-Type, then Identity (empty)."""
    return encode_command("READY", encode_properties([("Socket-Type", socket_type.encode()), ("Identity", identity)]))


def parse_command(body: bytes) -> tuple[str, bytes]:
    if not body or body[0] + 1 > len(body):
        raise ZmtpError("malformed command frame")
    n = body[0]
    return body[1:1 + n].decode("ascii", "replace"), body[1 + n:]


def parse_properties(data: bytes) -> dict[str, bytes]:
    props, i = {}, 0
    while i < len(data):
        n = data[i]
        name = data[i + 1:i + 1 + n].decode("ascii", "replace")
        i += 1 + n
        if i + 4 > len(data):
            raise ZmtpError("malformed property")
        (vlen,) = struct.unpack(">I", data[i:i + 4])
        props[name] = data[i + 4:i + 4 + vlen]
        i += 4 + vlen
    return props


class FrameReader:
    """Incremental frame parser: feed it bytes as they arrive, take whole frames out."""

    def __init__(self, max_frame: int = 64 << 20) -> None:
        self.buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> tuple[int, bytes] | None:
        """(flags, body) of the next whole frame, or None until more bytes arrive."""
        b = self.buf
        if len(b) < 2:
            return None
        flags = b[0]
        if flags & FLAG_LONG:
            if len(b) < 9:
                return None
            (size,) = struct.unpack(">Q", bytes(b[1:9]))
            head = 9
        else:
            size, head = b[1], 2
        if size > self.max_frame:
            raise ZmtpError(f"frame of {size} bytes is over the limit")
        if len(b) < head + size:
            return None
        body = bytes(b[head:head + size])
        del b[:head + size]
        return flags, body


class ZmtpDealer:
    """Blocking DEALER for tests and tools: handshake, send one-frame messages, receive them."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader()
        self.peer_greeting = b""
        self.peer_properties: dict[str, bytes] = {}
        self.pings_answered = 0
        self._handshake()

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ZmtpError("connection closed during the handshake")
            out += chunk
        return bytes(out)

    def _handshake(self) -> None:
        self.sock.sendall(GREETING_NULL + ready_command("DEALER"))
        g = self._read_exact(64)
        if g[0] != 0xFF or not g[9] & 1:
            raise ZmtpError("peer is not ZMTP 3")
        if g[10] < 3:
            raise ZmtpError(f"peer speaks ZMTP {g[10]}.{g[11]}")
        if g[12:32].rstrip(b"\0") != b"NULL":
            raise ZmtpError(f"peer wants mechanism {g[12:32].rstrip(bytes(1))!r}")
        self.peer_greeting = g
        while True:
            frame = self._next_frame()
            flags, body = frame
            if not flags & FLAG_COMMAND:
                raise ZmtpError("expected READY, got a message")
            name, data = parse_command(body)
            if name == "ERROR":
                raise ZmtpError(f"peer refused: {data[1:1 + data[0]].decode(errors='replace') if data else ''}")
            if name == "READY":
                self.peer_properties = parse_properties(data)
                return

    def _next_frame(self) -> tuple[int, bytes]:
        while True:
            frame = self.reader.next()
            if frame is not None:
                return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ZmtpError("connection closed")
            self.reader.feed(chunk)

    def send(self, message: bytes) -> None:
        self.sock.sendall(encode_frame(message))

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message (one frame; multi-frame messages are joined), answering PINGs on the way.
        None when `timeout` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[bytes] = []
        while True:
            frame = self.reader.next()
            if frame is None:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self.sock.settimeout(remaining)
                try:
                    chunk = self.sock.recv(65536)
                except socket.timeout:
                    return None
                if not chunk:
                    raise ZmtpError("connection closed")
                self.reader.feed(chunk)
                continue
            flags, body = frame
            if flags & FLAG_COMMAND:
                name, data = parse_command(body)
                if name == "PING":
                    self.sock.sendall(encode_command("PONG", data[2:]))   # echo the context after the TTL
                    self.pings_answered += 1
                continue
            parts.append(body)
            if not flags & FLAG_MORE:
                return b"".join(parts)

    def close(self) -> None:
        self.sock.close()

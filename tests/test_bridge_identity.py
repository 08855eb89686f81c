"""Routing ids a client can claim: libzmq's ROUTER aborts the whole process when an id it generates for a
new peer is already held by a peer that claimed it in READY (`Identity`). Its generated ids are 0x00 plus
a counter that starts at glibc's `rand()`, which libzmq never seeds: with the default seed the first one
is always 00 6b8b4567. These tests claim the ids an unseeded server would hand out next, over raw ZMTP
against a real `gllm serve` process, and check the server keeps serving."""

from __future__ import annotations

import socket
import struct
import time

import msgpack

from gllm.bridge import protocol as P
from gllm.bridge import zmtp
from gllm.bridge.client import BridgeClient

from bridge_doubles import ServerProcess

GLIBC_FIRST_RANDOM = 0x6B8B4567      # random() right after start-up with glibc's default seed (1)


def claim(port: int, identity: bytes, socket_type: str = "DEALER") -> socket.socket:
    """A raw peer that finishes the ZMTP handshake claiming `identity`, then stays silent."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(zmtp.GREETING_NULL + zmtp.ready_command(socket_type, identity))
    reader, got = zmtp.FrameReader(), b""
    while len(got) < 64:
        chunk = s.recv(64 - len(got))
        assert chunk, "the server closed the connection during the greeting"
        got += chunk
    while True:
        frame = reader.next()
        if frame is not None:
            name, _ = zmtp.parse_command(frame[1])
            assert name == "READY"
            return s
        chunk = s.recv(4096)
        assert chunk, "the server closed the connection before READY"
        reader.feed(chunk)


def predicted_ids(n: int) -> list[bytes]:
    return [b"\x00" + struct.pack(">I", GLIBC_FIRST_RANDOM + k) for k in range(n)]


def serve_one(endpoint: str, name: str) -> None:
    with BridgeClient(endpoint, name=name) as client:
        client.connect()
        done = client.wait(client.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True), timeout_s=60)
        assert done.finish_reason == "length"


def test_claimed_routing_ids_do_not_crash_the_server(llama32_dir):
    with ServerProcess(llama32_dir, "--max-seq-len", "256", "--cpu-threads", "1") as srv:
        squatters = [claim(srv.port, ident) for ident in predicted_ids(8)]
        try:
            for i in range(4):               # each takes a generated id: the ones the squatters claimed
                serve_one(srv.endpoint, f"player-{i}")
                assert srv.alive(), srv.stderr()
            # a raw client with an empty identity (generated id) also gets in and is served
            dealer = zmtp.ZmtpDealer("127.0.0.1", srv.port)
            dealer.send(P.encode(P.hello("raw")))
            assert msgpack.unpackb(dealer.recv(timeout=30))["op"] == "welcome"
            dealer.close()
        finally:
            for s in squatters:
                s.close()
        time.sleep(0.2)
        assert srv.alive(), srv.stderr()
        serve_one(srv.endpoint, "after")

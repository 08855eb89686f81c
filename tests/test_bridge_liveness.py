"""Liveness and security of the bridge: clients that die, fall silent or stop reading lose their requests
(and their KV blocks) without anyone else noticing; public binds need a token or CURVE.

The server here listens on a wildcard (non-loopback) address with a token, a 1.5 s lease and small send
queues, so one server process covers both halves.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
import zmq

from gllm.bridge import protocol as P
from gllm.bridge.client import BridgeClient, BridgeError, Done, Error, Token
from gllm.bridge.server import BridgeServer, ServerConfig
from gllm.bridge.zmtp import ZmtpDealer
from gllm.frontend.helpers import is_local_address

from bridge_doubles import FakeEngine, ServerProcess

TOKEN = "s3cret-token"
LEASE_S = 1.5
# Requests that must outlive a lease ask for NEVER_ENDING tokens (ignore_eos): no machine is fast enough to
# finish them within a lease, so what ends them is the lease (or the client's death), by construction.
NEVER_ENDING = 60_000
SERVER_ARGS = ["--token", TOKEN, "--lease-s", str(LEASE_S), "--max-seq-len", "65536", "--max-batch-size", "8",
               "--kv-cache-tokens", str(4 * 65536),
               "--cpu-threads", "1", "--max-send-queue", "32", "--sndhwm", "8", "--sndbuf", "4096",
               "--heartbeat-ms", "500", "--log-level", "INFO", "--result-cache-entries", "0",
               # float32: the watcher's greedy text is compared alone against batched with the victim's rows, and
               # bfloat16 (what "auto" picks on an AVX512-BF16 CPU) rounds a batch of 4 differently from a batch
               # of 1 often enough to flip a near-tie of the random model within 150 tokens.
               "--dtype", "float32"]


@pytest.fixture(scope="module")
def server(llama32_dir):
    with ServerProcess(llama32_dir, *SERVER_ARGS, address="tcp://0.0.0.0:*") as srv:
        yield srv
        assert srv.alive(), srv.stderr()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class Raw:
    def __init__(self, endpoint: str, ctx: zmq.Context, token: str | None = TOKEN) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        if token is not None:
            self.send(P.hello("raw", token))
            assert self.recv()["op"] == "welcome"

    def send(self, msg: dict) -> None:
        self.sock.send(P.encode(msg))

    def recv(self, timeout: float = 10.0) -> dict:
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def stats(self) -> dict:
        self.send(P.stats_request())
        while True:
            m = self.recv()
            if m["op"] == "stats":
                return m

    def close(self) -> None:
        self.sock.close(0)


def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    end = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(interval)


def stream(client: BridgeClient, rid: str, timeout: float = 60.0, on_token=None) -> tuple[Done, str]:
    parts: list[str] = []
    end = time.monotonic() + timeout
    while True:
        assert time.monotonic() < end, "stream timed out"
        for ev in client.poll(10):
            if isinstance(ev, Token) and ev.id == rid:
                parts.append(ev.text)
                if on_token:
                    on_token(len(parts))
            elif isinstance(ev, Done) and ev.id == rid:
                return ev, "".join(parts)
            elif isinstance(ev, Error):
                raise AssertionError(f"unexpected error {ev}")


# ------------------------------------------------------------------------------------------ auth
def test_token_is_required_on_a_public_bind(server, ctx):
    assert server.endpoint.startswith("tcp://0.0.0.0:")
    ep = server.connect_endpoint()
    r = Raw(ep, ctx, token=None)
    r.send(P.hello("no-token"))
    assert (lambda e: (e["op"], e["code"], e["id"]))(r.recv()) == ("error", "unauthorized", None)
    r.send(P.hello("wrong", "guess"))
    assert r.recv()["code"] == "unauthorized"
    r.send(P.generate("g", prompt="hi"))
    e = r.recv()
    assert (e["code"], e["id"]) == ("no_session", "g")
    r.send(P.hello("right", TOKEN))
    assert r.recv()["op"] == "welcome"
    r.send(P.hello("wrong again", "nope"))          # a wrong token ends even a live session
    assert r.recv()["code"] == "unauthorized"
    r.send(P.ping(1))
    assert r.recv()["code"] == "no_session"
    r.close()
    with pytest.raises(BridgeError) as info:
        BridgeClient(ep, token="bad").connect(timeout_s=5)
    assert info.value.code == "unauthorized"


@pytest.mark.parametrize("address", ["tcp://0.0.0.0:5999", "tcp://*:5999", "tcp://10.1.2.3:5999", "tcp://eth0:5999",
                                     "tcp://[::]:5999", "tcp://example.com:5999"])
def test_public_bind_without_auth_is_refused(address, tmp_path):
    env = {**os.environ, "GLLM_BRIDGE_TOKEN": ""}
    cmd = [sys.executable, "-m", "gllm.bridge", "--zmq", address, "--model", str(tmp_path / "none")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "refusing" in p.stderr, p.stderr
    assert "listening" not in p.stdout
    # with a token or --insecure it gets past the check (and then fails on the missing model: exit 1)
    for extra in (["--token", "x"], ["--insecure"]):
        if address != "tcp://0.0.0.0:5999":
            break  # once is enough: each run costs an interpreter start
        p = subprocess.run(cmd + extra, capture_output=True, text=True, timeout=60, env=env)
        assert p.returncode == 1 and "refusing" not in p.stderr, p.stderr


def test_local_addresses():
    for a in ("tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5", "tcp://127.0.0.2:*", "ipc:///tmp/x",
              "inproc://x", "tcp://lo:5555"):
        assert is_local_address(a), a
    for a in ("tcp://0.0.0.0:5555", "tcp://*:1", "tcp://192.168.0.2:5", "tcp://eth0:5", "tcp://[::]:5",
              "pgm://eth0;239.192.1.1:5555", "tcp://host.lan:5"):
        assert not is_local_address(a), a
    with pytest.raises(ValueError, match="refusing"):
        ServerConfig(address="tcp://0.0.0.0:1", curve_secret_key=zmq.curve_keypair()[1]).validate()  # no allowlist
    ServerConfig(address="tcp://0.0.0.0:1", curve_secret_key=zmq.curve_keypair()[1],
                 curve_clients=frozenset()).validate()


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_admits_only_listed_clients():
    server_public, server_secret = zmq.curve_keypair()
    good_public, good_secret = zmq.curve_keypair()
    engine = FakeEngine(step_s=0.001)
    srv = BridgeServer(engine, ServerConfig(address="tcp://127.0.0.1:*", curve_secret_key=server_secret,
                                            curve_clients=frozenset({good_public})),
                       context=zmq.Context())
    srv.start()
    try:
        with BridgeClient(srv.endpoint, curve_server_key=server_public, curve_public_key=good_public,
                          curve_secret_key=good_secret, context=srv.ctx) as c:
            c.connect(timeout_s=5)
            d = c.wait(c.generate("hi", max_tokens=3), timeout_s=10)
            assert d.text == "w1 w2 w3 "
        with BridgeClient(srv.endpoint, curve_server_key=server_public, context=srv.ctx) as stranger:
            with pytest.raises(TimeoutError):
                stranger.connect(timeout_s=1.0)
        plain = BridgeClient(srv.endpoint, context=srv.ctx)     # NULL mechanism: refused in the handshake
        with pytest.raises(TimeoutError):
            plain.connect(timeout_s=1.0)
        plain.close()
    finally:
        srv.stop()
        engine.close()
        srv.ctx.destroy(linger=0)


# ------------------------------------------------------------------------------------------ liveness
VICTIM = textwrap.dedent("""
    import sys
    from gllm.bridge.client import BridgeClient, Token
    c = BridgeClient(sys.argv[1], token=sys.argv[2], name="victim")
    c.connect()
    for i in range(3):
        c.generate(f"Victim {i} says", max_tokens=int(sys.argv[3]), ignore_eos=True)
    seen = 0
    while True:
        for ev in c.poll(10):
            if isinstance(ev, Token):
                seen += 1
                if seen == 6:
                    print("streaming", flush=True)
""")


def test_sigkilled_client_is_cleaned_up_and_others_never_notice(server, ctx):
    ep = server.connect_endpoint()
    with BridgeClient(ep, token=TOKEN, name="watcher") as watcher:
        watcher.connect()
        baseline, base_text = stream(watcher, watcher.generate("The watcher said", max_tokens=150, temperature=0,
                                                               ignore_eos=True))
        victim = subprocess.Popen([sys.executable, "-c", VICTIM, ep, TOKEN, str(NEVER_ENDING)], stdout=subprocess.PIPE,
                                  text=True)
        try:
            line: list[str] = []
            reader = threading.Thread(target=lambda: line.append(victim.stdout.readline().strip()), daemon=True)
            reader.start()
            while reader.is_alive():   # the watcher keeps its lease while the victim starts (slow when loaded)
                assert not watcher.poll(50)
            assert line == ["streaming"]
            monitor = Raw(ep, ctx)                # from here on it talks at every token: its lease never lapses
            assert monitor.stats()["clients"] >= 3
            killed: dict[str, float] = {}

            def kill_and_watch(n: int) -> None:   # runs between the watcher's tokens
                if n == 20:
                    victim.send_signal(signal.SIGKILL)
                    killed["t"] = time.monotonic()
                s = monitor.stats()
                if n > 20 and "clean" not in killed and s["running"] + s["waiting"] == 1:
                    killed["clean"] = time.monotonic()    # only the watcher's own request is left

            rid = watcher.generate("The watcher said", max_tokens=150, temperature=0, ignore_eos=True)
            done, text = stream(watcher, rid, on_token=kill_and_watch)
        finally:
            victim.kill()
            victim.wait()
        # the watcher never noticed: same text as when it streamed alone, no error on the way
        assert (done.text, done.finish_reason, text) == (baseline.text, "length", base_text)
        if "clean" not in killed:   # the watcher finished first: keep looking
            wait_for(lambda: monitor.stats()["running"] == 0, 30, "the victim's clean-up")
            killed["clean"] = time.monotonic()
        # The victim's requests cannot have finished by themselves: the server ended them (on the disconnect,
        # or at the latest at the lease; the bound is only a hang guard).
        assert killed["clean"] - killed["t"] < 30
        s = wait_for(lambda: (lambda s: s if s["running"] + s["waiting"] == 0 else None)(monitor.stats()), 10,
                     "all requests to end")
        assert s["kv_free_blocks"] == s["kv_total_blocks"]
        assert "(victim) ended" in server.stderr()
        monitor.close()


def test_silent_client_loses_its_requests_after_the_lease(server, ctx):
    ep = server.connect_endpoint()
    monitor = Raw(ep, ctx)
    silent = Raw(ep, ctx)
    silent.send(P.generate("s", prompt="I will never speak again", max_tokens=NEVER_ENDING, ignore_eos=True))
    t0 = time.monotonic()
    assert silent.recv()["op"] == "tokens"
    wait_for(lambda: monitor.stats()["running"] == 1, 5, "the request to run")
    while time.monotonic() - t0 < LEASE_S - 0.5:   # keep the monitor's own lease alive meanwhile
        assert monitor.stats()["running"] == 1
        time.sleep(0.2)
    s = wait_for(lambda: (lambda s: s if s["running"] == 0 else None)(monitor.stats()), 30, "the lease to expire")
    elapsed = time.monotonic() - t0
    assert elapsed > LEASE_S - 0.5, elapsed     # never before the lease (the upper bound is only a hang guard)
    assert s["kv_free_blocks"] == s["kv_total_blocks"]
    # nothing more arrives for the dropped request (no done); the next message learns why
    msgs = []
    while silent.sock.poll(300):
        msgs.append(msgpack.unpackb(silent.sock.recv(), raw=False))
    assert all(m["op"] == "tokens" for m in msgs)
    silent.send(P.ping(1))
    e = silent.recv()
    assert e["code"] == "no_session" and "lease expired" in e["message"]
    silent.close()
    monitor.close()


def test_a_polling_client_keeps_its_session_past_the_lease(server):
    with BridgeClient(server.connect_endpoint(), token=TOKEN) as c:
        c.connect()
        rid = c.generate("Slow and steady", max_tokens=5)
        end = time.monotonic() + 2.5 * LEASE_S
        events = []
        while time.monotonic() < end:   # a game loop at ~50 fps doing nothing but poll
            events += c.poll(20)
        assert not [e for e in events if isinstance(e, Error)], events
        assert any(isinstance(e, Done) and e.id == rid for e in events)
        assert c.stats()["inflight"] == 0


def test_client_that_stops_reading_is_dropped(server, ctx):
    ep = server.connect_endpoint()
    monitor = Raw(ep, ctx)
    slow = ZmtpDealer("127.0.0.1", server.port, rcvbuf=2048)
    try:
        slow.send(P.encode(P.hello("slow", TOKEN)))
        for i in range(8):
            slow.send(P.encode(P.generate(f"r{i}", prompt=f"Flood {i}", max_tokens=NEVER_ENDING, ignore_eos=True,
                                          logprobs=20)))
        t0 = time.monotonic()

        def dropped():
            slow.send(P.encode(P.ping(None)))       # it keeps talking (so no lease expiry), it just never reads
            s = monitor.stats()
            gone = "(slow) ended: not reading: send queue full" in server.stderr()
            return s if gone and s["running"] + s["waiting"] == 0 else None

        s = wait_for(dropped, 40, "the slow reader to be dropped", interval=0.2)
        assert s["kv_free_blocks"] == s["kv_total_blocks"]
        assert time.monotonic() - t0 < 40
    finally:
        slow.close()
    monitor.close()

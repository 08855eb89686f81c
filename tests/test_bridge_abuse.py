"""Bridge sessions under abuse, against a real server process: token guessing, idle sessions filling the
server, pings carrying values the server never sends, and a shutdown with requests in flight."""

from __future__ import annotations

import signal
import time

import msgpack
import zmq

from gllm.bridge import protocol as P
from gllm.bridge.client import BridgeClient, Done, Error

from bridge_doubles import ServerProcess

ARGS = ("--max-seq-len", "512", "--cpu-threads", "1", "--max-batch-size", "4")


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)
    s.connect(endpoint)
    return s


def replies(sock: zmq.Socket, quiet_ms: int) -> list[dict]:
    """Every message that arrives until none has come for `quiet_ms`."""
    out = []
    while sock.poll(quiet_ms):
        out.append(msgpack.unpackb(sock.recv(), raw=False))
    return out


def test_wrong_tokens_are_answered_with_growing_back_off(llama32_dir):
    with ServerProcess(llama32_dir, *ARGS, "--token", "s3cret") as srv:
        ctx = zmq.Context()
        try:
            guesser = dealer(ctx, srv.endpoint)
            for i in range(2000):
                guesser.send(P.encode(P.hello("guesser", token=f"guess-{i}")))
            got = replies(guesser, 1500)
            # the first three wrong hellos are answered; the rest arrive during the back-off and are ignored
            assert 3 <= len(got) <= 8, got
            assert all(m["op"] == "error" and m["code"] == "unauthorized" for m in got)
            assert "ignored for 0.5 s" in got[2]["message"]
            # another connection is not locked out
            with BridgeClient(srv.endpoint, token="s3cret", name="game") as game:
                game.connect()
            # and the guesser's own connection gets in with the right token once its back-off is over
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline, "never welcomed after the back-off"
                guesser.send(P.encode(P.hello("guesser", token="s3cret")))
                answers = replies(guesser, 300)
                if any(m["op"] == "welcome" for m in answers):
                    break
            assert srv.alive()
        finally:
            ctx.destroy(0)


def test_idle_sessions_do_not_lock_a_game_out(llama32_dir):
    with ServerProcess(llama32_dir, *ARGS, "--max-clients", "2", "--lease-s", "60") as srv:
        ctx = zmq.Context()
        try:
            idle = [dealer(ctx, srv.endpoint) for _ in range(2)]
            for s in idle:
                s.send(P.encode(P.hello("squatter")))
                assert replies(s, 500)[0]["op"] == "welcome"
                s.send(P.encode(P.ping(1)))          # kept alive, but idle
                assert replies(s, 300)[0]["op"] == "pong"
            with BridgeClient(srv.endpoint, name="game") as game:
                game.connect()                       # the longest idle session makes room
                first = idle[0]
                first.send(P.encode(P.ping(2)))
                err = replies(first, 500)[0]
                assert err["op"] == "error" and err["code"] == "no_session" and "evicted" in err["message"]
                # sessions with requests in flight are never evicted: with both busy, a newcomer is refused.
                # Paced, so both are still in flight when it comes, however fast this machine decodes.
                idle[1].send(P.encode(P.generate("long", prompt="Tell a story", max_tokens=400, ignore_eos=True,
                                                 max_tokens_per_s=20)))
                rid = game.generate("Once upon a time", max_tokens=400, ignore_eos=True, max_tokens_per_s=20)
                late = dealer(ctx, srv.endpoint)
                late.send(P.encode(P.hello("late")))
                refused = [m for m in replies(late, 3000) if m["op"] == "error"]
                assert refused and refused[0]["code"] == "busy", refused
                game.cancel(rid)
                assert game.wait(rid, timeout_s=60).finish_reason == "cancelled"
        finally:
            ctx.destroy(0)


def test_pong_never_echoes_bin_or_ext(llama32_dir):
    with ServerProcess(llama32_dir, *ARGS) as srv:
        ctx = zmq.Context()
        try:
            s = dealer(ctx, srv.endpoint)
            s.send(P.encode(P.hello("pinger")))
            assert replies(s, 500)[0]["op"] == "welcome"
            for t in (b"bin", msgpack.ExtType(7, b"x"), [1, {"k": b"\x00"}], {b"key": 1},
                      msgpack.Timestamp(1, 0)):
                s.send(msgpack.packb({"op": "ping", "t": t}, use_bin_type=True, datetime=False))
                [m] = replies(s, 300)
                assert m["op"] == "error" and m["code"] == "bad_request" and "ping.t" in m["message"], (t, m)
            for t in (None, 5, "tick", [1, "a", {"f": 2.5}]):
                s.send(P.encode(P.ping(t)))
                assert replies(s, 300) == [{"op": "pong", "t": t}]
        finally:
            ctx.destroy(0)


def test_sigterm_ends_requests_in_flight_with_done(llama32_dir):
    srv = ServerProcess(llama32_dir, *ARGS).start()
    try:
        with BridgeClient(srv.endpoint, name="npc") as c:
            c.connect()
            ids = [c.generate("Once upon a time", max_tokens=400, ignore_eos=True) for _ in range(3)]
            seen = False
            while not seen:                           # running: tokens are coming
                seen = any(not isinstance(ev, (Done, Error)) for ev in c.poll(100))
            srv.proc.send_signal(signal.SIGTERM)
            done: dict[str, Done] = {}
            deadline = time.monotonic() + 60
            while len(done) < 3 and time.monotonic() < deadline:
                for ev in c.poll(100):
                    if isinstance(ev, Done):
                        done[ev.id] = ev
            assert set(done) == set(ids)
            assert all(d.finish_reason == "cancelled" for d in done.values())
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()

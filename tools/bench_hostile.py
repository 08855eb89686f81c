"""Hostile load against `gllm serve --zmq --http`: how long huge prompts stall other NPCs, where RSS ends up,
and how many wrong tokens one connection gets answered.

- (a) one 7.5 MB HTTP completion body while a bridge client streams: the stream's longest gap;
- (b) 16 x 1 MB bridge prompts from one client, then a small request from another: its first token's delay,
  and the streaming client's longest gap;
- (c) 20 x 7.5 MB HTTP bodies, then (d) 20 x 250 kB prompts (tokenized, then too long), `--rounds` times:
  the server's RSS before and after each;
- (e) one connection sending wrong-token hellos for 3 s to a `--token` server: hellos answered per second.

    python tools/bench_hostile.py [--model PATH] [--source DIR] [--rounds N] [--out out/bench_hostile.json]

`--source` runs the server from another checkout (e.g. `git archive HEAD | tar -x -C /tmp/orig`) for a
before/after comparison; the client side always runs from this one. Not a test: prints lines, writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gllm.bridge import protocol as P  # noqa: E402
from gllm.bridge.client import BridgeClient, Done, Error, Token  # noqa: E402

WORDS = "the smith hammered the glowing blade while the river ran past the mill and the crows watched "


def text(n: int) -> str:
    return (WORDS * (n // len(WORDS) + 1))[:n]


class Server:
    def __init__(self, source: Path, model: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "gllm.cli", "serve", "--model", str(model),
                                      "--zmq", "tcp://127.0.0.1:*", *args], stdout=subprocess.PIPE,
                                     stderr=tempfile.TemporaryFile(), text=True, env=env, cwd=source)
        self.ep: dict[str, str] = {}
        want = 2 if "--http" in args else 1
        while len(self.ep) < want:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the server did not start")
            for kind in ("bridge", "http"):
                if line.startswith(f"gllm {kind} listening on "):
                    self.ep[kind] = line.split(" on ", 1)[1].strip()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        return int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024

    def post(self, body: bytes) -> int:
        port = int(self.ep["http"].rsplit(":", 1)[1])
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        c.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def longest_gap_during(bridge: str, fn) -> tuple[float, float, object]:
    """(longest gap in ms between a streaming client's tokens while `fn` runs, fn's ms, fn's result)."""
    with BridgeClient(bridge, name="npc") as npc:
        npc.connect()
        rid = npc.generate("Once upon a time", max_tokens=100_000, temperature=0, ignore_eos=True)
        while not any(isinstance(e, Token) for e in npc.poll(100)):
            pass
        stop, times = threading.Event(), []

        def watch() -> None:
            while not stop.is_set():
                times.extend(time.monotonic() for e in npc.poll(2) if isinstance(e, Token))

        t = threading.Thread(target=watch)
        t.start()
        t0 = time.monotonic()
        out = fn()
        t1 = time.monotonic()
        stop.set()
        t.join()
        npc.cancel(rid)
    marks = [t0, *(x for x in times if t0 <= x <= t1), t1]
    return max(b - a for a, b in zip(marks, marks[1:])) * 1000, (t1 - t0) * 1000, out


def flood(bridge: str) -> float:
    """16 x 1 MB prompts, then a small request from another client: ms to its first token."""
    with BridgeClient(bridge, name="flood") as f, BridgeClient(bridge, name="late") as late:
        f.connect()
        late.connect()
        big = text(1_000_000)
        for _ in range(16):
            f.generate(big, max_tokens=4)
        t = time.monotonic()
        rid = late.generate("Hello", max_tokens=2, temperature=0)
        first = None
        while True:
            for e in late.poll(5):
                if isinstance(e, Token) and first is None:
                    first = time.monotonic() - t
                if isinstance(e, (Done, Error)) and e.id == rid:
                    answered = 0
                    while answered < 16:
                        answered += sum(isinstance(x, (Done, Error)) for x in f.poll(50))
                    return (first if first is not None else time.monotonic() - t) * 1000


def wrong_tokens(source: Path, model: Path) -> float:
    srv = Server(source, model, "--max-seq-len", "256", "--token", "s3cret")
    ctx = zmq.Context()
    try:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.RCVHWM, 0)
        s.setsockopt(zmq.SNDHWM, 0)
        s.connect(srv.ep["bridge"])
        msg, got, t0 = P.encode(P.hello("guesser", token="wrong")), 0, time.monotonic()
        while time.monotonic() - t0 < 3:
            for _ in range(200):
                s.send(msg)
            while s.poll(0):
                s.recv()
                got += 1
        elapsed = time.monotonic() - t0
        while s.poll(500):
            s.recv()
            got += 1
        return got / elapsed
    finally:
        ctx.destroy(0)
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--source", type=Path, default=ROOT)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tools"))
        import make_test_models
        model = make_test_models.build_all()["tiny-llama32"]
    result: dict[str, object] = {"source": str(args.source)}
    srv = Server(args.source, model, "--http", "127.0.0.1:0", "--max-seq-len", "2048", "--cpu-threads", "1",
                 "--lease-s", "60", "--max-message-bytes", str(2 << 20), "--max-body-mb", "8")
    try:
        result["rss_start_mb"] = srv.rss_mb()
        big = json.dumps({"prompt": text(7_500_000), "max_tokens": 4}).encode()
        gap, took, status = longest_gap_during(srv.ep["bridge"], lambda: srv.post(big))
        result["a"] = {"status": status, "answered_ms": took, "longest_gap_ms": gap}
        print(f"(a) 7.5 MB HTTP body: {status} in {took:.0f} ms; the stream's longest gap {gap:.0f} ms")
        gap, took, first = longest_gap_during(srv.ep["bridge"], lambda: flood(srv.ep["bridge"]))
        result["b"] = {"late_first_token_ms": first, "longest_gap_ms": gap}
        print(f"(b) 16 x 1 MB bridge prompts: another client's first token after {first:.0f} ms; "
              f"the stream's longest gap {gap:.0f} ms")
        mid = json.dumps({"prompt": text(250_000), "max_tokens": 4}).encode()
        rounds = []
        for _ in range(args.rounds):
            row = {}
            for name, body in (("c", big), ("d", mid)):
                before = srv.rss_mb()
                for _ in range(20):
                    srv.post(body)
                time.sleep(2)
                row[name] = (before, srv.rss_mb())
                print(f"({name}) 20 x {len(body) / 1e6:.2f} MB bodies: RSS {before:.0f} -> {row[name][1]:.0f} MB")
            rounds.append(row)
        result["rss_rounds"] = rounds
    finally:
        srv.stop()
    result["wrong_hellos_answered_per_s"] = rate = wrong_tokens(args.source, model)
    print(f"(e) wrong-token hellos answered on one connection: {rate:.0f}/s")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

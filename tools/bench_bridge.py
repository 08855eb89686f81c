"""Benchmark the ZeroMQ bridge: latency it adds per delivery, and messages/s with many clients.

Latency per delivery is measured from the moment the engine hands an event to its front end (the
`on_event` callback, on the engine thread) to the moment a consumer has it:
- in-process: an asyncio consumer in the same process (what `engine.stream()` does);
- bridge: a DEALER client in another process, through `BridgeServer` (coalescing, msgpack, ZeroMQ, TCP).
Both ends read CLOCK_MONOTONIC (`time.perf_counter_ns` on Linux), so times compare across processes.
"Added" = bridge − in-process, at the same percentile.

Throughput: 16 clients (by default) stream at once; messages/s counts `tokens` messages the clients receive
(one per client per engine step), items/s the per-request deltas inside them. Run with the real model and
with a fake engine that steps flat out (the bridge's own ceiling).

    python tools/bench_bridge.py [--model PATH] [--out out/bench_bridge.json]

Without --model, the tiny random test model is used (tools/make_test_models.py), which keeps steps short so
the bridge's share is visible. Not a test: prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # the fake engine: tests/bridge_doubles.py

from gllm.bridge import protocol as P  # noqa: E402
from gllm.bridge.cli import READY_PREFIX  # noqa: E402


# ------------------------------------------------------------------------------------------ server child
def serve_child(args: argparse.Namespace) -> int:
    """Run a BridgeServer whose engine logs when it hands each event over; dump the log on SIGTERM."""
    from gllm.bridge.server import BridgeServer, ServerConfig
    emits: list[tuple[str, int, int]] = []
    if args.fake:
        from bridge_doubles import FakeEngine
        engine = FakeEngine(step_s=args.fake_step_s, max_batch_size=args.batch,
                            on_emit=lambda rid, step: emits.append((rid, step, time.perf_counter_ns())))
    else:
        from gllm.engine import GeneratorParams, LLMEngine
        engine = LLMEngine(args.model, GeneratorParams(result_cache_entries=0, max_batch_size=args.batch, max_seq_len=args.max_seq_len,
                                                       cpu_threads=args.cpu_threads), device=args.device)
        add = engine.add_request

        def add_request(req, on_event):
            rid = req.request_id

            def logged(ev):
                emits.append((rid, ev.step, time.perf_counter_ns()))
                on_event(ev)
            return add(req, logged)
        engine.add_request = add_request
    server = BridgeServer(engine, ServerConfig(address="tcp://127.0.0.1:*", max_inflight=256, lease_s=60,
                                               max_send_queue=1 << 20, sndhwm=100000))
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    server.serve_forever(ready=lambda ep: print(f"{READY_PREFIX}{ep}", flush=True))
    engine.close()
    Path(args.emit_log).write_text(json.dumps(emits))
    return 0


class Child:
    def __init__(self, argv: list[str]) -> None:
        self.log = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-child", "--emit-log", self.log, *argv],
                                     stdout=subprocess.PIPE, text=True, env=env)
        for line in self.proc.stdout:
            if line.startswith(READY_PREFIX):
                self.endpoint = line[len(READY_PREFIX):].strip()
                return
        raise RuntimeError("the server child did not start")

    def stop(self) -> dict[tuple[str, int], int]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        emits = json.loads(Path(self.log).read_text())
        os.unlink(self.log)
        return {(rid.split("/", 1)[1], step): t for rid, step, t in emits}


# ------------------------------------------------------------------------------------------ clients
def run_clients(endpoint: str, n_clients: int, per_client: int, rounds: int, gen: dict, spin: bool = False) -> dict:
    """n_clients DEALERs on one poller; each round every client starts `per_client` requests and waits.
    With `spin`, the clients never sleep in poll: they check every socket in a loop, as a game that polls
    each frame finds a message already there (the time is when it could first be read, without the wake-up
    of a sleeping thread)."""
    ctx = zmq.Context()
    socks = []
    for _ in range(n_clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, 0)
        s.connect(endpoint)
        s.send(P.encode(P.hello("bench")))
        socks.append(s)
    for s in socks:
        assert s.poll(30000) and msgpack.unpackb(s.recv())["op"] == "welcome"
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    received: list[tuple[str, int, int]] = []
    n_messages = n_items = 0
    first = last = None
    for rnd in range(rounds):
        for c, s in enumerate(socks):
            for j in range(per_client):
                s.send(P.encode(P.generate(f"c{c}r{rnd}q{j}", prompt=f"Client {c} request {j} round {rnd}:", **gen)))
        pending = n_clients * per_client
        while pending:
            for s, _ in ([(s, 0) for s in socks] if spin else poller.poll(1000)):
                while True:
                    try:
                        raw = s.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t = time.perf_counter_ns()
                    m = msgpack.unpackb(raw, raw=False)
                    if m["op"] == "tokens":
                        n_messages += 1
                        first = first or t
                        last = t
                        for it in m["items"]:
                            n_items += 1
                            received.append((it["id"], m["step"], t))
                    elif m["op"] == "done":
                        pending -= 1
                        last = t
                    elif m["op"] == "error":
                        raise RuntimeError(m)
    for s in socks:
        s.close(0)
    ctx.term()
    return {"received": received, "messages": n_messages, "items": n_items,
            "seconds": (last - first) / 1e9 if first and last and last > first else float("nan")}


def in_process(model: str, args: argparse.Namespace, n_requests: int, rounds: int, gen: dict) -> list[float]:
    """Delivery latency through the in-process asyncio path (or, with --spin, a consumer that checks a
    queue in a loop), same load, in ms."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    engine = LLMEngine(model, GeneratorParams(result_cache_entries=0, max_batch_size=args.batch, max_seq_len=args.max_seq_len,
                                              cpu_threads=args.cpu_threads), device=args.device)
    lat: list[float] = []
    if args.spin:
        import collections
        inbox: collections.deque = collections.deque()
        for rnd in range(rounds):
            for j in range(n_requests):
                req = GenerationRequest(prompt=f"Client {j} request 0 round {rnd}:", max_new_tokens=gen["max_tokens"],
                                        temperature=gen["temperature"], ignore_eos=True)
                engine.add_request(req, lambda ev: inbox.append((ev, time.perf_counter_ns())))
            left = n_requests
            while left:
                if not inbox:
                    time.sleep(0)   # let the engine thread have the GIL; no sleeping until woken
                    continue
                ev, t = inbox.popleft()
                lat.append((time.perf_counter_ns() - t) / 1e6)
                left -= ev.result is not None
        engine.close()
        return lat

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for rnd in range(rounds):
            q: asyncio.Queue = asyncio.Queue()
            for j in range(n_requests):
                req = GenerationRequest(prompt=f"Client {j} request 0 round {rnd}:", max_new_tokens=gen["max_tokens"],
                                        temperature=gen["temperature"], ignore_eos=True)
                engine.add_request(req, lambda ev: (lambda t: loop.call_soon_threadsafe(q.put_nowait, (ev, t)))(
                    time.perf_counter_ns()))
            left = n_requests
            while left:
                ev, t = await q.get()
                lat.append((time.perf_counter_ns() - t) / 1e6)
                left -= ev.result is not None
    asyncio.run(main())
    engine.close()
    return lat


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def latency(child_argv: list[str], n_clients: int, per_client: int, rounds: int, gen: dict,
            spin: bool = False) -> dict:
    child = Child(child_argv)
    try:
        run = run_clients(child.endpoint, n_clients, per_client, rounds, gen, spin)
    finally:
        emits = child.stop()
    lat = [(t - emits[(rid, step)]) / 1e6 for rid, step, t in run["received"] if (rid, step) in emits]
    return {"latency": pct(lat), "messages": run["messages"], "items": run["items"], "seconds": run["seconds"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model for the real-engine runs (default: the tiny test model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cpu-threads", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--clients", type=int, default=16, help="clients of the throughput runs")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request of the real-model runs")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spin", action="store_true",
                    help="latency runs: consumers check for messages in a loop instead of sleeping until one comes")
    ap.add_argument("--out", default="out/bench_bridge.json", help="JSON results (default out/bench_bridge.json)")
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--emit-log", help=argparse.SUPPRESS)
    ap.add_argument("--fake", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fake-step-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        return serve_child(args)
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tools"))
        import make_test_models
        model = str(make_test_models.build_all()["tiny-llama32"])
    common = ["--model", model, "--device", args.device, "--cpu-threads", str(args.cpu_threads),
              "--max-seq-len", str(args.max_seq_len)]
    gen = {"max_tokens": args.tokens, "temperature": 0.0, "ignore_eos": True}
    rows, out = [], {"model": model, "device": args.device, "cpu_threads": args.cpu_threads,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                     "zmq": zmq.zmq_version(), "consumers": "spin" if args.spin else "sleep", "runs": {}}

    # 1. latency at a batch of 8: 4 clients x 2 requests, vs the same 8 requests in-process
    inproc = pct(in_process(model, args, 8, args.rounds, gen))
    bridge = latency(common + ["--batch", "8"], 4, 2, args.rounds, gen, args.spin)
    out["runs"]["latency_model"] = {"in_process": inproc, "bridge": bridge["latency"],
                                    "added_p50_ms": bridge["latency"]["p50_ms"] - inproc["p50_ms"],
                                    "added_p99_ms": bridge["latency"]["p99_ms"] - inproc["p99_ms"]}
    rows.append(("in-process delivery, model, 8 requests", inproc, None))
    rows.append(("bridge delivery, model, 4 clients x 2", bridge["latency"], bridge))

    # 2. latency with a fake engine stepping every 5 ms (no model maths competing for the cores)
    fake = latency(["--fake", "--fake-step-s", "0.005", "--batch", "64"], 4, 2, args.rounds,
                   {"max_tokens": 200, "temperature": 0.0}, args.spin)
    out["runs"]["latency_fake_5ms"] = {"bridge": fake["latency"]}
    rows.append(("bridge delivery, fake engine 5 ms steps, 4x2", fake["latency"], fake))

    # 3. throughput: 16 clients, model (batch 16) and fake engine flat out (4 requests per client)
    thr_model = latency(common + ["--batch", str(args.clients)], args.clients, 1, 1, gen)
    thr_fake = latency(["--fake", "--fake-step-s", "0", "--batch", str(4 * args.clients)], args.clients, 4, 1,
                       {"max_tokens": 300, "temperature": 0.0})
    for key, run, label in (("throughput_model", thr_model, f"{args.clients} clients x 1, model"),
                            ("throughput_fake", thr_fake, f"{args.clients} clients x 4, fake engine flat out")):
        out["runs"][key] = {"clients": args.clients, "messages": run["messages"], "items": run["items"],
                            "seconds": run["seconds"], "messages_per_s": run["messages"] / run["seconds"],
                            "items_per_s": run["items"] / run["seconds"], "latency": run["latency"]}
        rows.append((label, run["latency"], run))

    print(f"\nbridge benchmark — {out['machine']}, libzmq {out['zmq']}, model {Path(model).name} on {args.device}, "
          f"consumers {out['consumers']}\n")
    print(f"{'run':48} {'deliveries':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'msgs/s':>9} {'items/s':>9}")
    for label, lat, run in rows:
        rate = (f"{run['messages'] / run['seconds']:9.0f} {run['items'] / run['seconds']:9.0f}" if run
                else f"{'':9} {'':9}")
        print(f"{label:48} {lat['n']:>10} {lat['p50_ms']:8.3f} {lat['p99_ms']:8.3f} {lat['max_ms']:8.3f} {rate}")
    lm = out["runs"]["latency_model"]
    print(f"\nadded by the bridge (model, batch 8): p50 {lm['added_p50_ms']:+.3f} ms, p99 {lm['added_p99_ms']:+.3f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

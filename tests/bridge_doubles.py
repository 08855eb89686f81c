"""Test doubles for the bridge (tests and tools/bench_bridge.py): a server subprocess, and a fake engine.

Tests import this as ``bridge_doubles`` (pytest puts tests/ on sys.path, as for ``helpers``); tools add
tests/ to sys.path themselves.

`ServerProcess` starts `python -m gllm.bridge` and waits for its ready line; the game-client test
suites (C#, C++, GDScript) use it to run against the real server:

    with ServerProcess(model_dir, "--lease-s", "2") as srv:
        ... connect to srv.endpoint (srv.port) ...

`FakeEngine` looks like the engine to a front end (`gllm.engine.interface.EngineAPI`: add_request,
cancel, stats, num_steps, step listeners, ...) and emits scripted tokens on its own thread, so server
mechanics and bridge overhead can be measured without a model.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gllm.bridge.cli import READY_PREFIX
from gllm.engine.request import GenerationResult, Timings, Usage


class ServerProcess:
    def __init__(self, model: str | Path | None, *args: str, address: str = "tcp://127.0.0.1:*",
                 ready_timeout: float = 120.0, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "gllm.bridge", "--zmq", address, *args]
        if model is not None:
            self.args += ["--model", str(model)]
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
                    "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self._stderr = tempfile.TemporaryFile()

    def start(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self._stderr, env=self.env, text=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise TimeoutError(f"the bridge server did not start in {self.ready_timeout} s:\n{self.stderr()}") \
                    from None
            if line is None:
                code = self.proc.wait()
                raise RuntimeError(f"the bridge server exited with {code}:\n{self.stderr()}")
            if line.startswith(READY_PREFIX):
                self.endpoint = line[len(READY_PREFIX):].strip()
                return self

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def connect_endpoint(self) -> str:
        """The endpoint to connect to (a wildcard bind is reached through loopback)."""
        host_port = self.endpoint.split("://", 1)[1]
        host = host_port.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "*", "[::]"):
            return f"tcp://127.0.0.1:{self.port}"
        return self.endpoint

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------------------------ fake engine
@dataclass
class _Event:
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: Any = None
    result: GenerationResult | None = None
    step: int = 0


@dataclass
class _StepInfo:
    step: int
    seconds: float = 0.0
    num_tokens: int = 0
    num_decodes: int = 0
    num_preempted: int = 0


@dataclass
class _GenParams:
    max_seq_len: int = 2048
    max_batch_size: int = 64


class FakeEngine:
    """Emits one token per running request per step, text ``"w{n} "``; `step_s` between steps (0: flat out).
    `on_emit(request_id, step)` (optional) is called just before each event is handed over (benchmarks)."""

    def __init__(self, step_s: float = 0.005, max_batch_size: int = 64, max_seq_len: int = 2048,
                 on_emit: Callable[[str, int], None] | None = None) -> None:
        self.step_s = step_s
        self.gen_params = _GenParams(max_seq_len, max_batch_size)
        self.model_name = "fake"
        self.device = "cpu"
        self.tokenizer = None
        self.num_steps = 0
        self.frames: list[tuple[float, float | None, str]] = []   # report_frame calls
        self.idles: list[tuple[float, str]] = []                   # report_idle calls
        self.on_emit = on_emit
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, dict[str, Any]] = {}
        self._waiting: list[dict[str, Any]] = []
        self._live: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listeners: list[Callable[[Any], None]] = []
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()

    def add_request(self, req: Any, on_event: Callable[[Any], None]) -> str:
        prompt = req.prompt if req.prompt is not None else " ".join(m["content"] for m in req.messages)
        n_prompt = max(1, len(prompt.split()))
        if n_prompt >= self.gen_params.max_seq_len:
            raise ValueError(f"prompt is {n_prompt} tokens; max_seq_len is {self.gen_params.max_seq_len}")
        if req.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be a positive integer")
        with self._lock:
            if req.request_id in self._live:
                raise ValueError(f"request_id {req.request_id!r} is already in flight")
            self._live.add(req.request_id)
        self._inbox.put(("add", {"id": req.request_id, "sink": on_event, "max": req.max_new_tokens, "n": 0,
                                 "text": "", "prompt": n_prompt, "t0": time.perf_counter(), "ttft": None}))
        return req.request_id

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def add_step_listener(self, listener: Callable[[Any], None]) -> None:
        self._listeners = [*self._listeners, listener]    # copy-on-write, as the engine does

    def remove_step_listener(self, listener: Callable[[Any], None]) -> None:
        self._listeners = [x for x in self._listeners if x is not listener]

    def report_frame(self, ms: float, target_ms: float | None = None, source: str = "python", *,
                     max_ms: float | None = None, frames: int | None = None, over: int | None = None) -> None:
        self.frames.append((ms, target_ms, source))

    def report_idle(self, ms: float, source: str = "python") -> None:
        self.idles.append((ms, source))

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> dict[str, Any]:
        return {"kv_free_blocks": 100 - len(self._running), "kv_total_blocks": 100, "running": len(self._running),
                "waiting": len(self._waiting), "prefix_cache_hits": 0, "prefix_cache_misses": 0,
                "steps": self.num_steps}

    def close(self) -> None:
        self._closed = True
        self._inbox.put(("close", None))
        self._thread.join(5)

    def _finish(self, r: dict[str, Any], reason: str, delta: str = "", tokens: list[int] | None = None) -> None:
        with self._lock:
            self._live.discard(r["id"])
        now = time.perf_counter()
        result = GenerationResult(r["id"], r["text"], list(range(r["n"])), reason, Usage(r["prompt"], r["n"]),
                         Timings(0.0, r["ttft"], (now - r["t0"]) * 1000))
        if self.on_emit:
            self.on_emit(r["id"], self.num_steps)
        r["sink"](_Event(r["id"], delta, tokens or [], None, result, self.num_steps))

    def _run(self) -> None:
        while True:
            block = not self._running and not self._waiting
            while True:
                try:
                    op, arg = self._inbox.get() if block else self._inbox.get_nowait()
                except queue.Empty:
                    break
                block = False
                if op == "close":
                    for r in list(self._running.values()) + self._waiting:
                        self._finish(r, "cancelled")
                    return
                if op == "add":
                    self._waiting.append(arg)
                elif op == "cancel":
                    r = self._running.pop(arg, None)
                    if r is None:
                        for i, w in enumerate(self._waiting):
                            if w["id"] == arg:
                                r = self._waiting.pop(i)
                                break
                    if r is not None:
                        self._finish(r, "cancelled")
            while self._waiting and len(self._running) < self.gen_params.max_batch_size:
                r = self._waiting.pop(0)
                self._running[r["id"]] = r
            if not self._running:
                continue
            self.num_steps += 1
            t0, n = time.perf_counter(), len(self._running)
            for rid, r in list(self._running.items()):
                r["n"] += 1
                delta = f"w{r['n']} "
                r["text"] += delta
                if r["ttft"] is None:
                    r["ttft"] = (time.perf_counter() - r["t0"]) * 1000
                if r["n"] >= r["max"]:
                    del self._running[rid]
                    self._finish(r, "length", delta, [r["n"]])
                else:
                    if self.on_emit:
                        self.on_emit(rid, self.num_steps)
                    r["sink"](_Event(rid, delta, [r["n"]], None, None, self.num_steps))
            info = _StepInfo(self.num_steps, time.perf_counter() - t0, n, n)
            for listener in self._listeners:
                listener(info)
            if self.step_s > 0:
                time.sleep(self.step_s)

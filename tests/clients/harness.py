"""The cross-client conformance harness: one scenario list (scenarios.json), run by every game client.

A client provides a console program that takes ``--spec FILE``; the harness

1. starts a real ``gllm serve`` (``python -m gllm.bridge``) on the tiny test model with the list's `server_args`,
2. asks the Python ``BridgeClient`` for the greedy text of every scenario's `reference` requests,
3. writes the spec: the server's host, port and limits, the scenarios (each reference request now carrying its
   ``expected_text``), every test vector of bindings/PROTOCOL.md §9 parsed out of the document (name, JSON
   text or null, hex), and the ports of scripted fake peers (fake_peers.py) for what the real server never does,
4. runs the program, answering its ``@@ restart-server`` requests (kill the server, start a new one on the same
   port, reply ``@@ restarted``), and
5. parses its ``PASS name`` / ``FAIL name: why`` / ``METRIC name k=v ...`` lines and the closing
   ``N passed, N failed`` line.

    run = ConformanceRun(model_dir, workdir)
    result = run.run(["mono", "Conformance.exe"])
    assert result.passed("handshake"), result.detail("handshake")

The program's contract (what a C#, GDScript or C++ runner implements) is in scenarios.json's "about".
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gllm.bridge.client import BridgeClient

from .fake_peers import FakePeers
from bridge_doubles import ServerProcess  # tests/ is on sys.path (pytest's rootdir conftest)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PROTOCOL_MD = ROOT / "bindings" / "PROTOCOL.md"
SCENARIOS_JSON = HERE / "scenarios.json"

VECTOR_RE = re.compile(r"<!-- vector: ([\w-]+) -->\s*(?:```json\n(.*?)\n```\s*)?```hex\n(.*?)\n```", re.S)
SUMMARY_RE = re.compile(r"^(?:\w+: )?(\d+) passed, (\d+) failed(?:, (\d+) skipped)?$")
CONTROL_PREFIX = "@@ "


def load_vectors(doc: Path = PROTOCOL_MD) -> list[dict[str, Any]]:
    """Every ``<!-- vector: NAME -->`` of the document: name, the JSON text (None for ZMTP vectors), the hex."""
    out, seen = [], set()
    for name, js, hx in VECTOR_RE.findall(doc.read_text(encoding="utf-8")):
        if name in seen:
            raise ValueError(f"vector {name} appears twice in {doc}")
        if not re.fullmatch(r"([0-9a-f]{2}[ \n])*[0-9a-f]{2}", hx):
            raise ValueError(f"vector {name}: malformed hex")
        if js:
            json.loads(js)   # must be valid JSON
        seen.add(name)
        out.append({"name": name, "json": js or None, "hex": " ".join(hx.split())})
    return out


def load_scenarios() -> dict[str, Any]:
    return json.loads(SCENARIOS_JSON.read_text(encoding="utf-8"))


SCENARIO_NAMES = [s["name"] for s in load_scenarios()["scenarios"]]
RESTARTS = sum(s.get("control") == "restart-server" for s in load_scenarios()["scenarios"])


def server_limits(args: list[str]) -> dict[str, Any]:
    """The limits a server started with `args` announces (what the handshake scenario checks)."""
    def arg(name: str, default: str) -> str:
        return args[args.index(name) + 1] if name in args else default
    return {"max_seq_len": int(arg("--max-seq-len", "2048")), "max_inflight": int(arg("--max-inflight", "16")),
            "lease_ms": int(float(arg("--lease-s", "5")) * 1000),
            "max_message_bytes": int(arg("--max-message-bytes", str(1 << 20)))}


@dataclass
class RunResult:
    returncode: int | None
    output: str
    results: dict[str, list[tuple[bool, str]]] = field(default_factory=dict)   # name -> every report of it
    metrics: dict[str, dict[str, str]] = field(default_factory=dict)
    summary: tuple[int, int] | None = None
    restarts: int = 0
    wall_s: float = 0.0
    fake_peer_errors: list[str] = field(default_factory=list)   # the client broke a fake peer's script

    def passed(self, name: str) -> bool:
        if name == "fake-peers" and self.fake_peer_errors:
            return False
        return self.results.get(name) == [(True, "")]

    def detail(self, name: str) -> str:
        reports = self.results.get(name)
        if not reports:
            return f"scenario {name} was not reported by the client program; its output:\n{self.output[-6000:]}"
        if len(reports) > 1:
            return f"scenario {name} was reported {len(reports)} times: {reports}"
        if name == "fake-peers" and self.fake_peer_errors:
            return f"the fake peers saw: {self.fake_peer_errors}; the client said: {reports[0][1] or 'passed'}"
        return reports[0][1] or "passed"


class ConformanceRun:
    def __init__(self, model_dir: str | Path, workdir: str | Path, server_args: list[str] | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.workdir = Path(workdir)
        self.data = load_scenarios()
        self.server_args = list(server_args if server_args is not None else self.data["server_args"])
        self.server: ServerProcess | None = None
        self.port: int | None = None
        self.log: list[str] = []

    # -- the server
    def start_server(self) -> ServerProcess:
        address = f"tcp://127.0.0.1:{self.port}" if self.port else "tcp://127.0.0.1:*"
        last: Exception | None = None
        for _ in range(20):   # a restarted server may find the port briefly held
            try:
                srv = ServerProcess(self.model_dir, *self.server_args, address=address).start()
                break
            except RuntimeError as exc:
                last = exc
                time.sleep(0.25)
        else:
            raise RuntimeError(f"could not start the server on {address}: {last}")
        self.server, self.port = srv, srv.port
        return srv

    def restart_server(self) -> None:
        assert self.server is not None
        proc = self.server.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)   # a crash: no goodbye, the connection just drops
            proc.wait()
        self.start_server()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    # -- references from the Python client
    def references(self) -> dict[str, Any]:
        """The Python client's answers: every reference request's greedy text (by id), the prompt of each request
        that `continues` another (its prompt + text + `suffix`) under ``"prompt:" + id``, and each
        `embed_reference`'s vectors under ``"embed:" + scenario name``."""
        assert self.server is not None
        out: dict[str, Any] = {}
        client = BridgeClient(self.server.connect_endpoint(), name="conformance-reference")
        try:
            client.connect()
            for sc in self.data["scenarios"]:
                reqs = sc.get("reference") or []
                prompts = {r["id"]: r.get("prompt") for r in reqs}
                # Requests that continue another run after it; the others are sent together, as the client
                # under test sends them.
                for wave in ([r for r in reqs if "continues" not in r], [r for r in reqs if "continues" in r]):
                    ids = {}
                    for r in wave:
                        if "continues" in r:
                            base = r["continues"]
                            prompts[r["id"]] = prompts[base] + out[base] + r.get("suffix", "")
                            out["prompt:" + r["id"]] = prompts[r["id"]]
                        params = {k: v for k, v in r.items() if k not in ("id", "prompt", "messages", "continues",
                                                                          "suffix")}
                        ids[r["id"]] = client.generate(prompts[r["id"]], messages=r.get("messages"), **params)
                    for rid, wire_id in ids.items():
                        done = client.wait(wire_id, timeout_s=120)
                        out[rid] = done.text
                if "embed_reference" in sc:
                    out["embed:" + sc["name"]] = [list(v) for v in client.embed(sc["embed_reference"]["input"])]
        finally:
            client.close()
        return out

    def write_spec(self, refs: dict[str, Any], fake_ports: dict[str, int] | None = None) -> Path:
        scenarios = []
        for sc in self.data["scenarios"]:
            sc = dict(sc)
            if "reference" in sc:
                sc["reference"] = [dict(r, expected_text=refs[r["id"]], **({"prompt": refs["prompt:" + r["id"]]}
                                                                              if "continues" in r else {}))
                                   for r in sc["reference"]]
            if "embed_reference" in sc:
                sc["embed_reference"] = dict(sc["embed_reference"], expected_vectors=refs["embed:" + sc["name"]])
            scenarios.append(sc)
        spec = {"host": "127.0.0.1", "port": self.port, "server": server_limits(self.server_args),
                "vectors": load_vectors(), "scenarios": scenarios, "fake_peers": fake_ports or {}}
        path = self.workdir / "conformance-spec.json"
        path.write_text(json.dumps(spec, indent=1, ensure_ascii=False), encoding="utf-8")
        return path

    # -- the client program
    def run(self, command: list[str], timeout_s: float = 600.0, env: dict[str, str] | None = None) -> RunResult:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.start_server()
        fakes = FakePeers()
        try:
            refs = self.references()
            spec = self.write_spec(refs, fakes.ports)
            result = self._run_program(command + ["--spec", str(spec)], timeout_s, env)
            result.fake_peer_errors = list(fakes.errors)
            return result
        finally:
            fakes.close()
            self.stop_server()

    def _run_program(self, command: list[str], timeout_s: float, env: dict[str, str] | None) -> RunResult:
        t0 = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="replace", env={**os.environ, **(env or {})},
                                cwd=self.workdir, bufsize=1)
        result = RunResult(None, "")
        lines: list[str] = []
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                lines.append(line)
                if line.startswith(CONTROL_PREFIX):
                    reply = self._control(line[len(CONTROL_PREFIX):].strip())
                    result.restarts += reply == "restarted"
                    lines.append(f"[harness] {reply}")
                    try:
                        proc.stdin.write(CONTROL_PREFIX + reply + "\n")
                        proc.stdin.flush()
                    except OSError:
                        pass
                    continue
                self._parse(line, result)
            result.returncode = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if result.returncode is not None and result.returncode < 0:
            lines.append(f"[harness] the program was killed (signal {-result.returncode}; timeout {timeout_s} s?)")
        result.output = "\n".join(lines)
        result.wall_s = time.monotonic() - t0
        return result

    def _control(self, command: str) -> str:
        if command == "restart-server":
            try:
                self.restart_server()
                return "restarted"
            except Exception as exc:   # reported to the program, which fails the scenario
                return f"error {type(exc).__name__}: {exc}"
        return f"error unknown control command {command!r}"

    @staticmethod
    def _parse(line: str, result: RunResult) -> None:
        if line.startswith("PASS "):
            result.results.setdefault(line[5:].strip(), []).append((True, ""))
        elif line.startswith("FAIL "):
            name, _, why = line[5:].partition(":")
            result.results.setdefault(name.strip(), []).append((False, why.strip() or "failed"))
        elif line.startswith("METRIC "):
            parts = line.split()
            if len(parts) >= 2:
                kv = dict(p.split("=", 1) for p in parts[2:] if "=" in p)
                result.metrics.setdefault(parts[1], {}).update(kv)
        else:
            m = SUMMARY_RE.match(line.strip())
            if m:
                result.summary = (int(m.group(1)), int(m.group(2)))


# ------------------------------------------------------------------------------------------ shared checks
POLL_COST_KEYS = {"idle_median_ms", "idle_p99_ms", "streams16_median_ms", "streams16_p99_ms"}


def check_complete_run(result: RunResult) -> dict[str, str]:
    """What every client's run must show: each scenario reported once, the summary line, exit code 0, one server
    restart answered per `restart-server` scenario, and the poll-cost metrics; returns those metrics."""
    n = len(SCENARIO_NAMES)
    assert sorted(result.results) == sorted(SCENARIO_NAMES), result.output[-4000:]
    assert result.summary == (n, 0), result.output[-4000:]
    assert result.returncode == 0
    assert result.restarts == RESTARTS
    cost = result.metrics.get("poll-cost", {})
    assert POLL_COST_KEYS <= set(cost), cost
    return cost


def wrong_vector_spec(directory: Path, mutation: str) -> Path:
    """A spec holding only the `vectors` scenario, with one vector spoilt (`mutation`: "hex", one byte; "json",
    one value): a runner must fail it."""
    vectors = load_vectors()
    for v in vectors:
        if v["name"] == "generate-messages":
            if mutation == "hex":
                v["hex"] = v["hex"][:-2] + "fe"                    # priority -1 -> -2
            else:
                v["json"] = v["json"].replace('"seed": 1234', '"seed": 1235')
    spec = {"host": "127.0.0.1", "port": 1, "server": {}, "vectors": vectors,
            "scenarios": [s for s in load_scenarios()["scenarios"] if s["name"] == "vectors"]}
    path = directory / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def check_wrong_vector_failed(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL vectors: generate-messages" in proc.stdout, proc.stdout
    assert "0 passed, 1 failed" in proc.stdout

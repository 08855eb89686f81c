"""The frame benchmark: a simulated game beside `gllm serve`, and what the NPCs cost its frames.

The game is this process: a 60 fps loop doing fixed real work each frame (numpy matrix products spread over
`--game-threads` threads, sized to `--work` of the 16.7 ms frame), polling one bridge client once per frame
and sending `frame` reports, as a game using a gllm client does. Meanwhile it keeps `--npcs` NPC replies
streaming through the bridge and sends a new long prompt (`--long-tokens`) every `--long-every-s` seconds.

Runs (each `--seconds` long, after a warm-up; `--runs` picks them), one lever at a time:
- `no-llm`: the game alone (no server): the baseline frame times;
- `llm-plain`: beside `gllm serve --compute-nice 0`, the game sending no frame reports (the engine as it
  was before it yielded to games);
- `llm-nice`: the server's default lower thread priority, no frame reports;
- `llm-idle`: the engine's threads in the OS's idle scheduling class (`--compute-idle`), no frame reports;
- `llm-governed`: the defaults a game gets: lower priority, and frame reports (about 4 a second, as the
  clients send them: the smoothed time, the longest frame, the frames and those over 1.1x target since the
  previous report) driving the frame governor;
- `llm-windowed`: as `llm-governed`, and at the end of each frame's work the game also sends `idle` with the
  time left until its next frame: the engine computes only in those windows (on the CPU a step pauses
  between layers for the next window);
- `llm-windowed-no-pauses`: as `llm-windowed`, with the CPU's layer pauses off (`--no-layer-pauses`);
- `llm-windows-only`: `idle` windows without frame reports (so the frame governor never acts);
- `llm-idle-governed`: as `llm-governed`, with the idle scheduling class.
`--serve-args` adds `gllm serve` flags to every server run; `--baseline DIR` runs each server run a second
time with another checkout's server (an A/B in one invocation: one calibration of the game's work, runs
interleaved; every other repeat runs the baseline's first). `--repeats N` runs the list N times, interleaved
(so that the machine's drift falls on every lever alike), and prints each run's medians and ranges: on a
shared 2-core VM one run's p99 and share of frames over moved by more than the levers did.

Prints frame time (work + poll: what the game's own frame costs) p50/p99/max, the fraction of frames over
1.1x the target, the client's per-frame poll cost, NPC output tokens/s and TTFT p50/p99; writes JSON and
one PNG (frame time over time for every run; matplotlib, a tool dependency only).

    python tools/bench_frame.py [--model NAME_OR_PATH] [--device cpu] [--npcs 14] [--work 0.6]
        [--game-threads 2] [--game-device cpu|cuda] [--seconds 20] [--runs no-llm,llm] [--out bench_frame.json]
        [--plot bench_frame.png]

GPU variant (a render on the GPU beside the engine on the same GPU; random 1B weights, tools/make_random_model.py):
    python tools/bench_frame.py --model /tmp/llama-1b --device cuda --game-device cuda --work 0.9
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one BLAS thread per game thread: the game owns its threads
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

FRAME_S = 1 / 60
BASELINE_SUFFIX = "@base"
PERSONAS = ["a tired town guard", "a cheerful blacksmith", "a nervous priest", "an old fisherman", "a bard",
            "a greedy merchant", "the Duke's steward", "a wandering knight", "a witch of the marsh", "a stable boy",
            "an innkeeper", "a retired soldier", "a scholar of dragons", "a river pilot", "a beggar who was a king",
            "a young thief"]
LORE = ("Eldmoor is a river town under the Ashen Mountains. The old dragon Veyra sleeps in the northern peaks; "
        "the smiths' guild forges her shed scales into armour; the Duke taxes every cart on the Stone Bridge. ")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class GameWork:
    """Fixed work per frame, split over `threads` threads (numpy releases the GIL in its matrix products)."""

    def __init__(self, threads: int, share: float) -> None:
        self.threads, self.share = threads, share
        self.pool = ThreadPoolExecutor(threads)
        self.size = 64
        self.reps = 1
        rng = np.random.default_rng(0)
        self.mats = [rng.standard_normal((512, 512)).astype(np.float32) for _ in range(threads)]

    def _task(self, i: int) -> None:
        m = self.mats[i][: self.size, : self.size]
        for _ in range(self.reps):
            m @ m

    def run(self) -> None:
        for f in [self.pool.submit(self._task, i) for i in range(self.threads)]:
            f.result()

    def calibrate(self) -> float:
        """Size the work so a frame's share of 16.7 ms is spent (measured now, with nothing else running)."""
        goal = self.share * FRAME_S
        self.size, self.reps = 128, 1
        for _ in range(4):   # reps of a small product, refined a few times
            took = statistics.median(self._timed() for _ in range(15))
            self.reps = max(1, round(self.reps * goal / max(took, 1e-6)))
        return statistics.median(self._timed() for _ in range(31))

    def _timed(self) -> float:
        t = time.perf_counter()
        self.run()
        return time.perf_counter() - t


class GpuGameWork(GameWork):
    """The GPU variant: a render stand-in, bf16 matrix products on CUDA sized to `share` of the frame, the frame
    ending when the GPU has finished them (as a frame waits for its render)."""

    def __init__(self, share: float) -> None:
        import torch
        self.torch, self.share, self.threads = torch, share, 1
        self.size, self.reps = 4096, 1
        self.a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def run(self) -> None:
        a = self.a[: self.size, : self.size]
        for _ in range(self.reps):
            a @ a
        self.torch.cuda.synchronize()

    def calibrate(self) -> float:
        goal = self.share * FRAME_S
        self.size, self.reps = 2048, 1
        for _ in range(5):
            took = statistics.median(self._timed() for _ in range(15))
            self.reps = max(1, round(self.reps * goal / max(took, 1e-6)))
        return statistics.median(self._timed() for _ in range(31))


@dataclass
class RunResult:
    label: str
    frame_ms: list[float] = field(default_factory=list)
    frame_t: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0
    error_codes: dict = field(default_factory=dict)   # code -> count (the bridge's error codes)
    duty: list[tuple[float, int]] = field(default_factory=list)   # (s, the engine's governor duty cycle %)
    server: dict = field(default_factory=dict)   # the server's last stats (steps, step times, governor)

    def summary(self) -> dict:
        over = sum(1 for x in self.frame_ms if x > 1.1 * FRAME_S * 1000)
        return {"frames": len(self.frame_ms), "frame_p50_ms": percentile(self.frame_ms, 50),
                "frame_p99_ms": percentile(self.frame_ms, 99), "frame_max_ms": max(self.frame_ms, default=0.0),
                "frames_over_1.1x_target": over / max(1, len(self.frame_ms)),
                "poll_p50_ms": percentile(self.poll_ms, 50), "poll_p99_ms": percentile(self.poll_ms, 99),
                "npc_tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
                "server_stats": self.server,
                "ttft_p50_ms": percentile(self.ttft_ms, 50), "ttft_p99_ms": percentile(self.ttft_ms, 99),
                "errors": self.errors, "error_codes": self.error_codes}


class Npcs:
    """Keeps `n` NPC replies streaming and a long prompt arriving every `long_every_s`, through one client."""

    def __init__(self, client, n: int, long_tokens: int, long_every_s: float, rng: random.Random) -> None:
        self.client, self.n, self.rng = client, n, rng
        self.long_words = long_tokens * 3 // 4 + 1        # ~1.3 tokens a word in English lore
        self.long_every_s = long_every_s
        self.live: set[str] = set()
        self.next_long = 0.0
        self.count = 0

    def top_up(self, now: float) -> None:
        while len(self.live) < self.n:
            self.count += 1
            persona = PERSONAS[self.count % len(PERSONAS)]
            rid = self.client.generate(messages=[{"role": "system", "content": f"{LORE}You are {persona}."},
                                                 {"role": "user", "content": f"Traveller #{self.count}: any news?"}],
                                       max_tokens=48, temperature=0.7, seed=self.count, ignore_eos=True)
            self.live.add(rid)
        if now >= self.next_long:
            self.next_long = now + self.long_every_s
            words = " ".join(self.rng.choice(LORE.split()) for _ in range(self.long_words))
            self.count += 1
            self.live.add(self.client.generate(prompt=f"[{self.count}] {words}", max_tokens=16, ignore_eos=True))


def game_loop(label: str, work: GameWork, seconds: float, warmup_s: float, endpoint: str | None,
              npcs: int, long_tokens: int, long_every_s: float, report_frames: bool,
              report_windows: bool = False) -> RunResult:
    from gllm.bridge.client import BridgeClient, Done, Error, StatsReply, Token
    result = RunResult(label)
    client = npc = None
    if endpoint is not None:
        client = BridgeClient(endpoint, name="bench-frame")
        client.connect()
        npc = Npcs(client, npcs, long_tokens, long_every_s, random.Random(1))
    start = time.perf_counter()
    measure_from = start + warmup_s
    deadline = measure_from + seconds
    next_frame = start
    smoothed: float | None = None
    counted = over = 0          # frames since the last report, and of those over 1.1 x target
    longest = 0.0
    next_report = start
    next_stats = start
    while True:
        frame_start = time.perf_counter()
        if frame_start >= deadline:
            break
        work.run()
        poll = 0.0
        if client is not None:
            npc.top_up(frame_start)
            t = time.perf_counter()
            events = client.poll(0)
            poll = time.perf_counter() - t
            for ev in events:
                if isinstance(ev, Token) and frame_start >= measure_from:
                    result.tokens += ev.n
                elif isinstance(ev, Done):
                    npc.live.discard(ev.id)
                    if frame_start >= measure_from and ev.timings.get("ttft_ms") is not None:
                        result.ttft_ms.append(ev.timings["ttft_ms"])
                elif isinstance(ev, Error):
                    npc.live.discard(ev.id)
                    result.errors += 1
                    result.error_codes[ev.code] = result.error_codes.get(ev.code, 0) + 1
                elif isinstance(ev, StatsReply) and frame_start >= measure_from:
                    result.duty.append((frame_start - measure_from, ev.values.get("governor_duty_pct", 100)))
                    result.server = dict(ev.values)
        frame_ms = (time.perf_counter() - frame_start) * 1000
        smoothed = frame_ms if smoothed is None else smoothed + 0.2 * (frame_ms - smoothed)
        counted, longest = counted + 1, max(longest, frame_ms)
        over += frame_ms > 1.1 * FRAME_S * 1000
        if client is not None and report_frames and frame_start >= next_report:
            # As the game clients do: ~4 reports a second, each with the smoothed time and the frames since the last.
            client.frame(smoothed, FRAME_S * 1000, max_ms=longest, frames=counted, over=over)
            counted = over = 0
            longest = 0.0
            next_report = frame_start + 0.25
        if client is not None and frame_start >= next_stats:
            client.request_stats()                      # the governor's duty cycle, for the plot
            next_stats = frame_start + 0.5
        if frame_start >= measure_from:
            result.frame_ms.append(frame_ms)
            result.frame_t.append(frame_start - measure_from)
            result.poll_ms.append(poll * 1000)
        next_frame += FRAME_S
        pause = next_frame - time.perf_counter()
        if client is not None and report_windows and pause > 0:
            client.idle(pause * 1000)                   # the frame's work is done: the device is free until then
        if pause > 0:
            time.sleep(pause)
        else:
            next_frame = time.perf_counter()          # a late frame: the next one starts now (no catch-up burst)
    result.seconds = seconds
    if client is not None:
        for rid in list(npc.live):
            client.cancel(rid)
        client.close()
    return result


TARGET_OVER_SHARE = 0.01   # issue 18's target with the governor on: at most 1 % of frames over 1.1 x target


class Server:
    def __init__(self, model: str | None, device: str | None, extra: list[str], root: str | None = None) -> None:
        """`root`: a checkout whose `gllm serve` runs instead of this one's (`--baseline`)."""
        cmd = [sys.executable, "-m", "gllm.cli", "serve", "--zmq", "tcp://127.0.0.1:*", "--result-cache-entries", "0",
               *extra]   # compute is what is measured: no reply from the result cache
        if model:
            cmd += ["--model", model]
        if device:
            cmd += ["--device", device]
        env = None   # the baseline's gllm first; what else is on the path (its dependencies) kept
        if root is not None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                [os.path.abspath(root), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env,
                                     cwd=root)
        self.endpoint = ""
        end = time.time() + 300
        while time.time() < end:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self._stderr.seek(0)
                tail = "".join(self._stderr.readlines()[-15:])
                raise RuntimeError(f"gllm serve exited before listening (status {self.proc.returncode}):\n{tail}")
            if line.startswith("gllm bridge listening on "):
                self.endpoint = line.split()[-1]
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self._stderr.close()


def plot(results: list[RunResult], path: str, work_share: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, duty_ax) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=(3, 1))
    for i, r in enumerate(results):
        colour = f"C{i}"
        ax.plot(r.frame_t, r.frame_ms, lw=0.7, color=colour,
                label=f"{r.label} (p99 {percentile(r.frame_ms, 99):.1f} ms)")
        if r.duty:
            duty_ax.step([t for t, _ in r.duty], [d for _, d in r.duty], where="post", color=colour, label=r.label)
    ax.axhline(FRAME_S * 1000, color="k", ls="--", lw=0.8, label="60 fps target")
    ax.set_yscale("log")
    ax.set_ylabel("frame time (work + poll), ms")
    ax.set_title(f"Simulated game ({work_share:.0%} of a 60 fps frame of work) beside gllm serve")
    ax.legend(loc="upper right", fontsize=8)
    duty_ax.set_ylabel("engine duty %")
    duty_ax.set_ylim(0, 105)
    duty_ax.set_xlabel("s")
    duty_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--npcs", type=int, default=14)
    parser.add_argument("--work", type=float, default=0.6, help="the game's work, as a share of a 16.7 ms frame")
    parser.add_argument("--game-threads", type=int, default=2)
    parser.add_argument("--game-device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: the game's work is bf16 matrix products on the GPU (a render stand-in)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--long-tokens", type=int, default=1000)
    parser.add_argument("--long-every-s", type=float, default=2.0)
    parser.add_argument("--runs", default="no-llm,llm-plain,llm-nice,llm-governed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the list this many times, interleaved; medians (and ranges) per run are printed")
    parser.add_argument("--serve-args", default="", help="extra `gllm serve` flags for the llm runs")
    parser.add_argument("--baseline", default=None,
                        help="another checkout (e.g. `git worktree add /tmp/base HEAD~1`): every llm run is also "
                             "run with its `gllm serve`, right after, as RUN@base (same game calibration, interleaved)")
    parser.add_argument("--out", default="bench_frame.json")
    parser.add_argument("--plot", default="bench_frame.png")
    parser.add_argument("--replot", default=None, help="draw --plot from this JSON (a run made elsewhere) and stop")
    args = parser.parse_args()
    if args.replot:
        replot(args.replot, args.plot)
        return

    work = GpuGameWork(args.work) if args.game_device == "cuda" else GameWork(args.game_threads, args.work)
    calibrated = work.calibrate()
    where = "the GPU" if args.game_device == "cuda" else f"{args.game_threads} threads"
    print(f"game work: {calibrated * 1000:.1f} ms a frame on {where} ({calibrated / FRAME_S:.0%} of 16.7 ms)",
          flush=True)
    runs = {"no-llm": None, "llm-plain": (["--compute-nice", "0"], False), "llm-nice": ([], False),
            "llm-governed": ([], True), "llm-windowed": ([], "windows"),
            "llm-windowed-no-pauses": (["--no-layer-pauses"], "windows"),
            "llm-windows-only": ([], "windows-only"), "llm-idle": (["--compute-idle"], False),
            "llm-idle-governed": (["--compute-idle"], True)}
    labels = args.runs.split(",")
    for label in labels:
        if label not in runs:
            parser.error(f"unknown run {label!r}; runs: {', '.join(runs)}")
    if args.baseline:   # each server run again with the baseline's server, right after it
        labels = [x for label in labels for x in ([label] if runs[label] is None else [label, label + BASELINE_SUFFIX])]
    repeats: dict[str, list[dict]] = {label: [] for label in labels}
    for repeat in range(args.repeats):
        # Odd repeats run each A/B pair baseline first: on a noisy machine the second of two runs in a row
        # fared better whatever its code (docs/benchmarks.md, sessions 26-27), so neither side always goes first.
        results = run_list(swap_pairs(labels) if repeat % 2 else labels, runs, work, args)
        base = next((r for r in results if r.label == "no-llm"), None)
        for r in results:
            summary = r.summary()
            if base is not None:
                summary["p99_vs_no_llm"] = percentile(r.frame_ms, 99) / percentile(base.frame_ms, 99)
            repeats[r.label].append(summary)
    if args.repeats > 1:
        print(f"medians of {args.repeats} interleaved repeats [min - max]:")
        for label, summaries in repeats.items():
            parts = [f"{label:>17}:"]
            for key, name, scale, unit in (("p99_vs_no_llm", "p99", 1, "x"),
                                           ("frames_over_1.1x_target", "over", 100, " %"),
                                           ("npc_tokens_per_s", "NPCs", 1, " tok/s")):
                values = [x[key] * scale for x in summaries if key in x]
                if values and not (key == "npc_tokens_per_s" and label == "no-llm"):
                    parts.append(f"{name} {statistics.median(values):.2f}{unit} [{min(values):.2f} - {max(values):.2f}]")
            print(" ".join(parts), flush=True)
    report = {"work_share": args.work, "work_ms": calibrated * 1000, "game_threads": args.game_threads,
              "npcs": args.npcs, "long_tokens": args.long_tokens, "long_every_s": args.long_every_s,
              "seconds": args.seconds, "cpu_count": os.cpu_count(), "game_device": args.game_device,
              "runs": {label: summaries[-1] for label, summaries in repeats.items()},
              "repeats": repeats,
              # The last repeat's time series, so that `--replot` can draw them again where matplotlib is missing.
              "series": {r.label: {"t": r.frame_t, "ms": r.frame_ms, "duty": r.duty} for r in results}}
    with open(args.out, "w") as f:
        json.dump(report, f)
    try:
        plot(results, args.plot, args.work)
    except ImportError:
        print(f"wrote {args.out}; no matplotlib here: draw it elsewhere with --replot {args.out}")
        return
    print(f"wrote {args.out} and {args.plot}")


def swap_pairs(labels: list[str]) -> list[str]:
    """`labels` with each RUN, RUN@base pair in the other order."""
    out = list(labels)
    for i, label in enumerate(out[:-1]):
        if out[i + 1] == label + BASELINE_SUFFIX:
            out[i], out[i + 1] = out[i + 1], label
    return out


def run_list(labels: list[str], runs: dict, work, args) -> list[RunResult]:
    """One pass over the runs, each printed as it ends."""
    results = []
    for label in labels:
        server = report = None
        run = runs[label.removesuffix(BASELINE_SUFFIX)]
        if run is not None:
            serve_args, report = run
            root = args.baseline if label.endswith(BASELINE_SUFFIX) else None
            server = Server(args.model, args.device, serve_args + args.serve_args.split(), root)
        try:
            r = game_loop(label, work, args.seconds, args.warmup_s, server and server.endpoint, args.npcs,
                          args.long_tokens, args.long_every_s, report in (True, "windows"),
                          report in ("windows", "windows-only"))
        finally:
            if server is not None:
                server.stop()
        results.append(r)
        s = r.summary()
        print(f"{label:>8}: frame p50 {s['frame_p50_ms']:.1f} ms, p99 {s['frame_p99_ms']:.1f} ms, "
              f"max {s['frame_max_ms']:.1f} ms, over 1.1x target {s['frames_over_1.1x_target']:.1%}; "
              f"poll p50 {s['poll_p50_ms']:.3f} ms p99 {s['poll_p99_ms']:.3f} ms; "
              f"NPCs {s['npc_tokens_per_s']:.1f} tok/s, TTFT p50 {s['ttft_p50_ms']:.0f} ms p99 {s['ttft_p99_ms']:.0f} ms",
              flush=True)
        if r.server:
            v = r.server
            print(f"{'':>8}  server: {v.get('steps')} steps, step p50 {v.get('step_p50_us', 0) / 1000:.1f} ms "
                  f"p99 {v.get('step_p99_us', 0) / 1000:.1f} ms, budget {v.get('step_budget_us', 0) / 1000:.1f} ms, "
                  f"duty {v.get('governor_duty_pct')} %, computing {v.get('compute_ms', 0) / 1000:.1f} s, "
                  f"paused {v.get('governor_paused_ms', 0) / 1000:.1f} s; window steps {v.get('window_steps', 0)}, "
                  f"waits {v.get('window_waits', 0)}, spills {v.get('window_spills', 0)}", flush=True)
    base = next((r for r in results if r.label == "no-llm"), None)
    if base is not None:
        for r in results:
            print(f"{r.label:>8}: p99 frame = {percentile(r.frame_ms, 99) / percentile(base.frame_ms, 99):.2f}x "
                  "the no-LLM p99")
        alone_over = base.summary()["frames_over_1.1x_target"]
        if alone_over > TARGET_OVER_SHARE:   # the machine, not the engine: this pass cannot test that target
            print(f"  note: the game alone ran {alone_over:.1%} of its frames over 1.1x target (the target for the "
                  f"runs beside the engine is {TARGET_OVER_SHARE:.0%}): this pass cannot test it")
    return results


def replot(report_path: str, png: str) -> None:
    report = json.loads(Path(report_path).read_text())
    results = []
    for label, series in report["series"].items():
        r = RunResult(label, frame_ms=series["ms"], frame_t=series["t"])
        r.duty = [tuple(d) for d in series["duty"]]
        results.append(r)
    plot(results, png, report["work_share"])
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

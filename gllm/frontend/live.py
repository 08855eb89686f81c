"""What the live dashboard shows: requests in flight with their text so far, recent ones, throughput,
the step-time histogram, and any extra status sources (the frame governor, when there is one).

Fed from the engine thread (request events of every front end, the step listener) and the front ends'
threads (rejections, bridge sessions), and read from the HTTP thread, so every access goes through one
lock and every update is O(1) and never blocks for long.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.0167, 0.025, 0.0333, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass(eq=False)
class _LiveRequest:
    request_id: str
    front_end: str
    kind: str
    preview: str
    started: float                      # time.monotonic()
    started_wall: float                 # time.time()
    text: str = ""
    dropped_chars: int = 0              # text trimmed from the front to bound memory
    tokens: int = 0
    first_token: float | None = None


@dataclass
class _Totals:
    started: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


class LiveView:
    def __init__(self, *, max_text_chars: int = 4000, max_recent: int = 20, window_s: int = 60,
                 step_buckets: tuple[float, ...] = STEP_BUCKETS_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_text_chars = max_text_chars
        self.window_s = window_s
        self.step_buckets = tuple(step_buckets)
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, _LiveRequest] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=max_recent)
        self._step_counts = [0] * (len(self.step_buckets) + 1)
        self._step_total = 0
        self._step_seconds = 0.0
        self._last_step_s: float | None = None
        self._steps: deque[tuple[float, float, int, int]] = deque()   # (at, seconds, tokens, decodes) in the window
        self._totals = _Totals()
        self._sources: dict[str, Callable[[], Any]] = {}
        self.bridge_clients = 0

    # ------------------------------------------------------------------ feeding (any thread)
    def begin(self, request_id: str, front_end: str, kind: str, preview: str) -> None:
        now = self._clock()
        with self._lock:
            self._totals.started += 1
            self._live[request_id] = _LiveRequest(request_id, front_end, kind, preview, now, time.time())

    def add_text(self, request_id: str, text: str, num_tokens: int) -> None:
        with self._lock:
            r = self._live.get(request_id)
            if r is None:
                return
            if num_tokens and r.first_token is None:
                r.first_token = self._clock()
            r.tokens += num_tokens
            if text:
                r.text += text
                extra = len(r.text) - self.max_text_chars
                if extra > 0:
                    r.text = r.text[extra:]
                    r.dropped_chars += extra

    def end(self, request_id: str, outcome: str, *, completion_tokens: int | None = None,
            ttft_ms: float | None = None, error: str | None = None) -> None:
        now = self._clock()
        with self._lock:
            r = self._live.pop(request_id, None)
            if r is None:
                return
            self._totals.by_outcome[outcome] = self._totals.by_outcome.get(outcome, 0) + 1
            self._recent.appendleft({
                "id": r.request_id, "front_end": r.front_end, "kind": r.kind, "preview": r.preview,
                "text": r.text[-500:], "outcome": outcome,
                "tokens": completion_tokens if completion_tokens is not None else r.tokens,
                "ttft_ms": ttft_ms, "duration_s": round(now - r.started, 3), "ended_at": time.time(),
                "error": error,
            })

    def count_rejected(self, front_end: str) -> None:
        with self._lock:
            self._totals.by_outcome["rejected"] = self._totals.by_outcome.get("rejected", 0) + 1

    def on_step(self, seconds: float, num_tokens: int, num_decodes: int) -> None:
        now = self._clock()
        with self._lock:
            self._step_counts[bisect.bisect_left(self.step_buckets, seconds)] += 1
            self._step_total += 1
            self._step_seconds += seconds
            self._last_step_s = seconds
            self._steps.append((now, seconds, num_tokens, num_decodes))
            self._trim(now)

    def add_source(self, name: str, fn: Callable[[], Any]) -> None:
        """Show ``fn()`` (JSON-able) under ``name`` in the live JSON; "frame" is the dashboard's frame panel."""
        with self._lock:
            self._sources[name] = fn

    # ------------------------------------------------------------------ reading
    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - self.window_s:
            self._steps.popleft()

    def snapshot(self, max_requests: int = 32) -> dict[str, Any]:
        now = self._clock()
        with self._lock:
            self._trim(now)
            live = sorted(self._live.values(), key=lambda r: r.started)
            requests = [{
                "id": r.request_id, "front_end": r.front_end, "kind": r.kind, "preview": r.preview,
                "text": r.text, "text_truncated": r.dropped_chars > 0, "tokens": r.tokens,
                "state": "generating" if r.first_token is not None else "queued",
                "age_s": round(now - r.started, 3),
                "ttft_ms": None if r.first_token is None else round((r.first_token - r.started) * 1000, 1),
                "tokens_per_s": (round(r.tokens / (now - r.first_token), 1)
                                 if r.first_token is not None and now - r.first_token > 0.05 else None),
            } for r in live[:max_requests]]
            steps = list(self._steps)
            counts = list(self._step_counts)
            total, seconds, last = self._step_total, self._step_seconds, self._last_step_s
            recent = list(self._recent)
            totals = {"started": self._totals.started, "by_outcome": dict(self._totals.by_outcome)}
            sources = dict(self._sources)
            num_live = len(live)

        last3 = [(at, t, d) for at, _, t, d in steps if at >= now - 3.0]       # the last 3 s of steps
        span = max(0.25, now - last3[0][0]) if last3 else 1.0                  # only as long as they ran
        gen = sum(d for _, _, d in last3)
        comp = sum(t for _, t, _ in last3)
        series = [0] * self.window_s                       # generated tokens per second, oldest first
        for at, _, _, d in steps:
            age = int(now - at)
            if 0 <= age < self.window_s:
                series[self.window_s - 1 - age] += d
        extra: dict[str, Any] = {}
        for name, fn in sources.items():
            try:
                extra[name] = fn()
            except Exception as exc:  # a status source's failure shows, it does not break the page
                extra[name] = {"error": f"{type(exc).__name__}: {exc}"}
        edges = list(self.step_buckets) + [math.inf]
        return {
            "requests": requests,
            "num_live": num_live,
            "recent": recent,
            "totals": totals,
            "throughput": {"generated_tokens_per_s": round(gen / span, 1),
                           "computed_tokens_per_s": round(comp / span, 1),
                           "generated_per_s_series": series},
            "steps": {"count": total, "mean_ms": round(seconds / total * 1000, 3) if total else None,
                      "last_ms": None if last is None else round(last * 1000, 3),
                      "window_count": len(steps),
                      "buckets": [{"le_ms": None if math.isinf(e) else round(e * 1000, 4), "count": c}
                                  for e, c in zip(edges, counts)]},
            "bridge_clients": self.bridge_clients,
            "sources": extra,
        }

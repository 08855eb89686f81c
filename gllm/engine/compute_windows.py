"""`ComputeWindows`: the engine computes in the game's idle phase, when the game says when that is.

A game that knows when its frame's work is done (the CPU frame ends, the GPU's render has finished) tells the
engine how long it will not need the device: `LLMEngine.report_idle(ms)`, or the bridge's `idle` message, once
per frame. While a game sends those, the engine launches a step only inside such a window and only one whose
predicted time fits what is left of it (`share` of it, less `margin_s` for the report's own latency): its
steps then never overlap the game's work instead of time-slicing the device with it. A step that cannot be
cut to fit (one decode row) waits for the next window. Sources that stop reporting for `stale_s` no longer
count; with none left the engine computes freely again.

Several sources: the engine computes only where all their windows overlap (the tightest one governs).
Pure logic with explicit time; `open` from any thread, the rest from the engine thread (`wait_for_report`
blocks it until the next report).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class WindowConfig:
    share: float = 0.85       # of a window's remaining time, what a step may be predicted to take
    margin_s: float = 2e-4    # held back for the report's trip and the step's launch
    stale_s: float = 0.1      # a source that sent no window for this long no longer counts (6 frames at 60 fps)
    max_window_s: float = 1.0  # longer windows are cut to this (a window is a frame's idle phase)

    def __post_init__(self) -> None:
        if not (0 < self.share <= 1 and self.margin_s >= 0 and self.stale_s > 0 and self.max_window_s > 0):
            raise ValueError(f"invalid WindowConfig: {self}")


class ComputeWindows:
    def __init__(self, config: WindowConfig | None = None) -> None:
        self.config = config or WindowConfig()
        self._until: dict[str, float] = {}      # source -> when its current window closes (monotonic s)
        self._seen: dict[str, float] = {}       # source -> its last report
        self._lock = threading.Lock()
        self._reported = threading.Condition(self._lock)
        self.reports = 0

    def open(self, source: str, seconds: float, now: float) -> None:
        """`source` will not need the device for the next `seconds`."""
        seconds = min(max(0.0, float(seconds)), self.config.max_window_s)
        with self._lock:
            self._until[source] = now + seconds
            self._seen[source] = now
            self.reports += 1
            self._reported.notify_all()

    def wait_for_report(self, seen: int, timeout_s: float) -> bool:
        """Block until a report after the `seen`-th (`reports` then) arrives, or `timeout_s` passed; True if one
        did."""
        with self._reported:
            return self._reported.wait_for(lambda: self.reports != seen, timeout_s)

    def forget(self, source: str) -> None:
        with self._lock:
            self._until.pop(source, None)
            self._seen.pop(source, None)

    def active(self, now: float) -> bool:
        """Whether some game reports windows lately (then the engine computes only inside them)."""
        with self._lock:
            for source in [s for s, seen in self._seen.items() if now - seen > self.config.stale_s]:
                del self._seen[source], self._until[source]
            return bool(self._seen)

    def closes_at(self, now: float) -> float | None:
        """When the window open now closes (monotonic s; in the past when none is open); None: no game reports."""
        if not self.active(now):
            return None
        with self._lock:
            return min(self._until.values())

    def budget_s(self, now: float, closes: float | None = None) -> float | None:
        """How long a step started now may take: None when no game reports windows; 0 outside a window.
        `closes`: `closes_at(now)`, when the caller has it already."""
        closes = self.closes_at(now) if closes is None else closes
        if closes is None:
            return None
        return max(0.0, (closes - now) * self.config.share - self.config.margin_s)

"""`FrameGovernor`: the engine yields to the game when the game's frames run over their target.

Games report their frame time and target (the bridge's `frame` message, which the game clients send about
four times a second with the smoothed frame time, or `LLMEngine.report_frame`, any number of times). Every
`window_s` the governor looks at the worst source's reports in that window (their 90th percentile over the
target, the "pressure") and sets the engine's duty cycle, the fraction of wall time it computes (it sleeps
between steps for the rest):

- pressure above 1 (frames over target): duty x `decrease` (multiplicative decrease: fast relief);
- pressure below `headroom` (frames well inside the target): duty + `increase` (additive increase: slow return);
- in between: hold. This dead band is what makes it settle instead of oscillating around the target;
- duty never below `floor`, so NPCs never starve; a source silent for `stale_s` stops counting, and with no
  source left the duty climbs back to 1 by the same additive steps.

Pure logic with explicit time: `report` may be called from any thread, `update` from the engine thread.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

DEFAULT_TARGET_MS = 1000 / 60


@dataclass(frozen=True)
class GovernorConfig:
    window_s: float = 0.25     # one decision per window
    decrease: float = 0.7      # duty factor when the worst source's frames run over target
    increase: float = 0.05     # duty step back up when they have headroom
    headroom: float = 0.85     # pressure below this is headroom
    floor: float = 0.1         # the least duty: NPCs keep a tenth of the engine's time
    stale_s: float = 2.0       # a source that stopped reporting this long ago no longer counts
    min_frames: int = 1        # reports a source needs in a window to count in it (clients send ~4 a second)

    def __post_init__(self) -> None:
        if not (0 < self.floor <= 1 and 0 < self.decrease < 1 and 0 < self.increase <= 1
                and 0 < self.headroom <= 1 and self.window_s > 0 and self.stale_s > 0 and self.min_frames >= 1):
            raise ValueError(f"invalid GovernorConfig: {self}")


class FrameGovernor:
    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self.duty = 1.0
        self.pressure: float | None = None              # the worst source's, at the last decision
        self._frames: dict[str, deque[tuple[float, float]]] = {}   # source -> (ms, target_ms) this window
        self._last_seen: dict[str, float] = {}
        self._decided_at: float | None = None
        self._lock = threading.Lock()

    def report(self, source: str, ms: float, target_ms: float | None, now: float) -> None:
        """One frame of `source` took `ms` against `target_ms` (None: 60 fps)."""
        target = target_ms if target_ms and target_ms > 0 else DEFAULT_TARGET_MS
        with self._lock:
            self._frames.setdefault(source, deque(maxlen=1024)).append((float(ms), float(target)))
            self._last_seen[source] = now

    def forget(self, source: str) -> None:
        """A source that went away (a client that disconnected)."""
        with self._lock:
            self._forget(source)

    @property
    def active(self) -> bool:
        return self.duty < 1.0 or bool(self._last_seen)

    def update(self, now: float) -> float:
        """Decide at most once a window; returns the duty cycle."""
        cfg = self.config
        if self._decided_at is None:
            self._decided_at = now
        if now - self._decided_at < cfg.window_s:
            return self.duty
        self._decided_at = now
        with self._lock:
            for source in [s for s, seen in self._last_seen.items() if now - seen > cfg.stale_s]:
                self._forget(source)
            windows = [list(frames) for frames in self._frames.values()]
            for frames in self._frames.values():
                frames.clear()
        pressures = [_p90([ms / target for ms, target in w]) for w in windows if len(w) >= cfg.min_frames]
        self.pressure = max(pressures) if pressures else None
        if self.pressure is not None and self.pressure > 1.0:
            self.duty = max(cfg.floor, self.duty * cfg.decrease)
        elif self.pressure is None and windows:
            pass                      # sources that reported too few frames this window: hold
        elif self.pressure is None or self.pressure < cfg.headroom:
            self.duty = min(1.0, self.duty + cfg.increase)
        return self.duty

    def _forget(self, source: str) -> None:
        self._frames.pop(source, None)
        self._last_seen.pop(source, None)

    def pause_after(self, step_s: float) -> float:
        """Seconds to sleep after a step of `step_s` so that computing takes `duty` of the wall time."""
        return step_s * (1.0 / self.duty - 1.0) if self.duty < 1.0 else 0.0


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

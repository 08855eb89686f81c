"""`FrameGovernor`: the engine yields to the game when the game's frames run over their target.

Games report their frame times (the bridge's `frame` message, which the game clients send about four times a
second, or `LLMEngine.report_frame`, any number of times). A report may count the frames since the one before
and how many of them ran over 1.1 x target (`frames`, `over`) and give the longest (`max_ms`): then the
governor sees every frame, hitches included, not only a smoothed time. Every `window_s` it judges each source
by its reports in that window and sets the engine's duty cycle, the fraction of wall time the engine computes
(it sleeps between steps for the rest), from the worst source:

- over: a counted frame over 1.1 x target in this window, and more than `over_share` of the source's counted
  frames over since the last decrease (at most `over_horizon_s` back) — the share a game may see, judged over
  enough frames to mean something (one frame in a quarter second is 6.7 %); without counts: the 90th
  percentile of its `ms` / target, the "pressure", above 1: duty x `decrease` (multiplicative decrease: fast
  relief);
- calm: no counted frame over this window (without counts: pressure below `headroom`), and at least
  `cooldown_s` since the last decrease: duty + `increase` (additive increase: slow return). Frames between
  the target and 1.1 x target are the game's own tolerance, so they count as calm: were they not, a game whose
  frames sit just over its target beside the engine would only ever see the duty fall;
- otherwise hold. The dead band and the cooldown are what make it settle instead of oscillating;
- a decision made late (decisions follow engine steps, and a step can outlast several windows) counts an
  over verdict once per window that passed (at most 8);
- while a game reports (or the duty is below 1), engine steps are also held to `step_budget_share` of the
  frame target and `headroom_share` of the frame's headroom (target minus the game's own smoothed frame
  time; at least `min_step_budget_ms`), `step_budget_s`: the scheduler cuts prefill chunks to fit, so a
  step beside a frame fits in what the frame leaves over;
- duty never below `floor`, so NPCs never starve; a source silent for `stale_s` stops counting, and with no
  source left the duty is back to 1 at once (no game is asking the engine to yield).

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
    over_share: float = 0.005  # counted frames over 1.1 x target beyond this share (since the last decrease): over
    over_horizon_s: float = 4.0   # how far back that share looks at most
    cooldown_s: float = 1.0    # no increase until this long after a decrease
    step_budget_share: float = 0.5   # while a game reports, an engine step takes at most this share of a frame,
    headroom_share: float = 0.8      # and at most this share of the frame's headroom (target - the game's time),
    min_step_budget_ms: float = 0.5  # but never less than this

    def __post_init__(self) -> None:
        if not (0 < self.floor <= 1 and 0 < self.decrease < 1 and 0 < self.increase <= 1
                and 0 < self.headroom <= 1 and self.window_s > 0 and self.stale_s > 0 and self.min_frames >= 1
                and 0 <= self.over_share < 1 and self.over_horizon_s >= self.window_s and self.cooldown_s >= 0
                and 0 < self.step_budget_share <= 10
                and 0 < self.headroom_share <= 1 and self.min_step_budget_ms > 0):
            raise ValueError(f"invalid GovernorConfig: {self}")


class FrameGovernor:
    def __init__(self, config: GovernorConfig | None = None) -> None:
        self.config = config or GovernorConfig()
        self.duty = 1.0
        self.pressure: float | None = None              # the worst source's, at the last decision
        self.over_share: float | None = None            # the worst counted share of frames over, at the last decision
        self._frames: dict[str, deque[FrameReport]] = {}   # source -> its reports this window
        self._counted: dict[str, deque[tuple[int, int]]] = {}   # source -> (frames, over) of its past windows
        self._last_seen: dict[str, float] = {}
        self._decided_at: float | None = None
        self._decreased_at = -float("inf")
        self.target_ms = DEFAULT_TARGET_MS               # the tightest frame target reported lately
        self.headroom_ms: float | None = None           # the least (target - the game's own frame time) lately
        self._lock = threading.Lock()

    def report(self, source: str, ms: float, target_ms: float | None, now: float, max_ms: float | None = None,
               frames: int | None = None, over: int | None = None) -> None:
        """`source`'s frames took `ms` (smoothed, or one frame's) against `target_ms` (None: 60 fps); optionally
        the longest since its previous report and how many frames, and how many over 1.1 x target, there were."""
        target = target_ms if target_ms and target_ms > 0 else DEFAULT_TARGET_MS
        report = FrameReport(float(ms), float(target), None if max_ms is None else float(max_ms),
                             None if frames is None else int(frames), None if over is None else int(over))
        with self._lock:
            self._frames.setdefault(source, deque(maxlen=1024)).append(report)
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
        elapsed = now - self._decided_at
        if elapsed < cfg.window_s:
            return self.duty
        self._decided_at = now
        with self._lock:
            for source in [s for s, seen in self._last_seen.items() if now - seen > cfg.stale_s]:
                self._forget(source)
            windows = [(source, list(frames)) for source, frames in self._frames.items()]
            for frames in self._frames.values():
                frames.clear()
            latest = [w[-1] for _, w in windows if w]
            if latest:
                self.target_ms = min(r.target_ms for r in latest)
                self.headroom_ms = min(r.target_ms - r.ms for r in latest)
        # A decision may come late (it is made after an engine step, and a step can be long): an over verdict
        # then stands for every window that passed.
        windows_passed = max(1, min(8, int(elapsed / cfg.window_s)))
        verdicts = [_judge(w, self._history(source, w), cfg) for source, w in windows if len(w) >= cfg.min_frames]
        pressures = [v.pressure for v in verdicts]
        shares = [v.over_share for v in verdicts if v.over_share is not None]
        if verdicts or not windows:   # a window in which live sources sent nothing keeps the last figures
            self.pressure = max(pressures) if pressures else None
            self.over_share = max(shares) if shares else None
        if any(v.over for v in verdicts):
            self.duty = max(cfg.floor, self.duty * cfg.decrease ** windows_passed)
            self._decreased_at = now
            for history in self._counted.values():   # the next verdict judges the new duty's frames
                history.clear()
        elif not verdicts and windows:
            pass                      # sources that reported too few frames this window: hold
        elif not self._last_seen:
            self.duty = 1.0           # no game reports any more (they stopped, or it left): nobody to yield to
        elif all(v.calm for v in verdicts) and now - self._decreased_at >= cfg.cooldown_s:
            self.duty = min(1.0, self.duty + cfg.increase)
        return self.duty

    def _history(self, source: str, reports: list[FrameReport]) -> deque[tuple[int, int]]:
        """`source`'s counted (frames, over) since the last decrease, this window's included."""
        horizon = max(1, round(self.config.over_horizon_s / self.config.window_s))
        history = self._counted.setdefault(source, deque(maxlen=horizon))
        counted = [r for r in reports if r.frames is not None]
        if counted:
            history.append((sum(r.frames for r in counted), sum(r.over or 0 for r in counted)))
        return history

    def _forget(self, source: str) -> None:
        self._frames.pop(source, None)
        self._counted.pop(source, None)
        self._last_seen.pop(source, None)

    def step_budget_s(self) -> float | None:
        """While a game reports its frames (or the duty is below 1), how long one engine step should take at
        most: a share of the game's frame, so that a long prompt's prefill is cut into steps the game can live
        beside, and the governor's next decision is never a long step away; None otherwise."""
        if self.duty >= 1.0 and not self._last_seen:
            return None
        cfg = self.config
        budget_ms = cfg.step_budget_share * self.target_ms
        if self.headroom_ms is not None:   # a step beside a frame with 2 ms to spare should take less than 2 ms
            budget_ms = min(budget_ms, max(cfg.min_step_budget_ms, cfg.headroom_share * self.headroom_ms))
        return budget_ms / 1000

    def pause_after(self, step_s: float) -> float:
        """Seconds to sleep after a step of `step_s` so that computing takes `duty` of the wall time."""
        return step_s * (1.0 / self.duty - 1.0) if self.duty < 1.0 else 0.0


@dataclass(frozen=True)
class FrameReport:
    ms: float
    target_ms: float
    max_ms: float | None = None
    frames: int | None = None
    over: int | None = None


@dataclass(frozen=True)
class _Verdict:
    over: bool
    calm: bool
    pressure: float                 # the 90th percentile of ms / target (or the longest frame's, with max_ms)
    over_share: float | None        # counted frames over / counted frames since the last decrease; None without


def _judge(reports: list[FrameReport], history: deque[tuple[int, int]], cfg: GovernorConfig) -> _Verdict:
    """One source's window of reports (and its counted windows since the last decrease, this one included):
    over its target, calm, or neither."""
    counted = [r for r in reports if r.frames is not None]
    if counted:
        over = sum(r.over or 0 for r in counted)
        longest = [r.max_ms / r.target_ms for r in counted if r.max_ms is not None]
        pressure = max(longest) if longest else _p90([r.ms / r.target_ms for r in counted])
        frames_since = sum(f for f, _ in history)
        share = sum(o for _, o in history) / frames_since if frames_since else 0.0
        return _Verdict(over=over > 0 and share > cfg.over_share, calm=over == 0, pressure=pressure,
                        over_share=share)
    pressure = _p90([r.ms / r.target_ms for r in reports])
    return _Verdict(over=pressure > 1.0, calm=pressure < cfg.headroom, pressure=pressure, over_share=None)


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

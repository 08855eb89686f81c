"""`StepCostModel`: how long a step will take, learned from the steps this device has run.

    seconds ~ fixed + per_prefill_token * prefill_tokens + per_decode_row * decode_rows + per_kv_token * kv_tokens
              + per_prefill_step * (1 if the step prefills at all)

(`kv_tokens`: the attention work, each row's new tokens times the context they attend over; the last term is
what a step with prompt tokens costs beyond a decode-only one whatever its size: on a GPU a decode-only step
replays a CUDA graph, a step with a prefill chunk launches its kernels one by one). Fitted on the
last `window` steps by least squares with Huber weights (a few reweighting rounds), so the odd step slowed
by something else on the machine does not drag the fit; a coefficient the data makes negative is dropped
and the rest refitted.
The scheduler asks it how many prefill tokens still fit a step's time budget (`largest_within`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

FEATURES = ("fixed", "per_prefill_token", "per_decode_row", "per_kv_token", "per_prefill_step")


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int = 0
    decode_rows: int = 0
    kv_tokens: int = 0

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.prefill_tokens, self.decode_rows, self.kv_tokens, float(self.prefill_tokens > 0)])


class StepCostModel:
    def __init__(self, window: int = 256, refit_every: int = 16, min_steps: int = 24) -> None:
        self._rows: deque[np.ndarray] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self.refit_every, self.min_steps = refit_every, min_steps
        self.coef: np.ndarray | None = None          # seconds per unit of each feature, once fitted
        self.observed = 0

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def observe(self, shape: StepShape, seconds: float, shared: bool = False) -> None:
        """Learn a step's time. `shared`: the step ran on into the game's next frame, so its time is partly the
        game's work on the same device; it teaches only a model not yet fitted (learning only from steps that
        fit left the model unfitted where none did, and unfitted it let whole batches through, every one of
        them spilling: docs/benchmarks.md, session 9), never a fitted one, whose fit it would drag towards
        the render's time (docs/benchmarks.md, session 27)."""
        if shared and self.ready:
            return
        self._rows.append(shape.vector())
        self._seconds.append(seconds)
        self.observed += 1
        if self.observed >= self.min_steps and self.observed % self.refit_every == 0:
            self.fit()

    def predict(self, shape: StepShape) -> float:
        assert self.coef is not None, "the model is not fitted yet"
        return float(shape.vector() @ self.coef)

    def largest_within(self, budget_s: float, limit: int, shape_with) -> int:
        """The largest n in [0, limit] whose step `shape_with(n)` is predicted to take at most `budget_s`."""
        if self.predict(shape_with(limit)) <= budget_s:
            return limit
        lo, hi = 0, limit                    # predict(shape_with(n)) grows with n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(shape_with(mid)) <= budget_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def fit(self) -> None:
        x, y = np.array(self._rows), np.array(self._seconds)
        active = [i for i in range(len(FEATURES)) if i == 0 or np.ptp(x[:, i]) > 0]
        coef = np.zeros(len(FEATURES))
        for _ in range(len(FEATURES)):
            sub = _huber_lstsq(x[:, active], y)
            negative = [a for a, c in zip(active, sub) if c < 0 and a != 0]
            if not negative:
                coef[active] = sub
                break
            active = [a for a in active if a not in negative]
        coef[0] = max(coef[0], 0.0)
        self.coef = coef

    def as_dict(self) -> dict[str, float]:
        return {} if self.coef is None else dict(zip(FEATURES, map(float, self.coef)))


def _huber_lstsq(x: np.ndarray, y: np.ndarray, rounds: int = 4) -> np.ndarray:
    weights = np.ones(len(y))
    coef = np.zeros(x.shape[1])
    for _ in range(rounds):
        w = np.sqrt(weights)[:, None]
        coef = np.linalg.lstsq(x * w, y * w[:, 0], rcond=None)[0]
        residual = y - x @ coef
        scale = 1.4826 * np.median(np.abs(residual - np.median(residual))) + 1e-9
        k = 1.345 * scale
        weights = np.where(np.abs(residual) <= k, 1.0, k / np.maximum(np.abs(residual), 1e-12))
    return coef

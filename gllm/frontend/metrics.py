"""Prometheus metrics for one engine and its front ends, plus the dashboard's live view.

`Metrics` holds its own `CollectorRegistry` (never the global one), so two servers in one process,
or a test creating many, never collide. Three feeds:

- the engine's step listener (engine thread): step-time histogram, computed tokens, preemptions;
- a request tracker that wraps a front end's ``on_event`` (engine thread): requests by outcome,
  prompt/completion tokens, time to first token, inter-token latency, request duration;
- a collector read at scrape time from ``engine.stats()``: running/waiting requests, KV blocks,
  prefix-cache hits/misses and hit rate, engine steps.

Front ends share one `Metrics` (`gllm serve --zmq ... --http ...` gives both the same one): the HTTP server
tracks its requests as ``front_end="http"``, the ZeroMQ bridge its ``generate``s as ``front_end="bridge"``
(``metrics.track(request_id, on_event, front_end=...)``), each counts what it refuses before the engine sees
it (`count_rejected`), and the bridge reports its sessions with ``metrics.set_bridge_clients(n)``.
Needs prometheus-client (``pip install gllm[http]``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gllm.frontend.live import STEP_BUCKETS_S, LiveView

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI
    from gllm.engine.request import StepInfo, StreamEvent

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.0167, 0.025, 0.0333, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")


# Engine stats published as they are, scaled from the stats' integer units to base units:
# (family, metric name, help, stats key, value when absent, divisor).
_SCALED_STATS = (
    (GaugeMetricFamily, "governor_duty_ratio", "Share of wall time the engine computes (the frame governor "
     "lowers it while games report frames over their target)", "governor_duty_pct", 100, 100),
    (CounterMetricFamily, "governor_paused_seconds", "Time the engine slept between steps for the game",
     "governor_paused_ms", 0, 1000),
    (CounterMetricFamily, "engine_compute_seconds", "Time the engine spent in steps", "compute_ms", 0, 1000),
    (GaugeMetricFamily, "governor_frame_pressure_ratio", "The worst reporting game's frame time over its target "
     "at the governor's last decision (0: no reports)", "governor_pressure_pct", 0, 100),
    (GaugeMetricFamily, "governor_frames_over_ratio", "The worst reporting game's share of frames over 1.1 x "
     "target since the governor last yielded (up to 4 s back)", "governor_frames_over_permille", 0, 1000),
    (GaugeMetricFamily, "engine_step_p50_seconds", "Median of the last 512 engine steps' times", "step_p50_us", 0,
     1e6),
    (GaugeMetricFamily, "engine_step_p99_seconds", "99th percentile of the last 512 engine steps' times",
     "step_p99_us", 0, 1e6),
    (GaugeMetricFamily, "engine_step_budget_seconds", "The step-time budget (0: none)", "step_budget_us", 0, 1e6),
    # NPC memory (issue #23)
    (CounterMetricFamily, "result_cache_hits", "Deterministic requests answered from the prompt-result cache",
     "result_cache_hits", 0, 1),
    (CounterMetricFamily, "result_cache_misses", "Deterministic requests looked up and not found in the "
     "prompt-result cache", "result_cache_misses", 0, 1),
    (GaugeMetricFamily, "result_cache_entries", "Results held in the prompt-result cache", "result_cache_entries",
     0, 1),
    (GaugeMetricFamily, "result_cache_bytes", "Bytes held by the prompt-result cache (estimated)",
     "result_cache_bytes", 0, 1),
    (GaugeMetricFamily, "kv_blocks_pinned", "KV cache blocks kept resident by pins", "pinned_blocks", 0, 1),
)


class _EngineCollector:
    """Gauges and counters read from ``engine.stats()`` at scrape time (always current, even when idle)."""

    def __init__(self, engine: EngineAPI, prefix: str) -> None:
        self.engine = engine
        self.prefix = prefix

    def describe(self) -> list:
        return []   # no up-front description: nothing is read before the first scrape

    def collect(self):
        p = self.prefix
        s = self.engine.stats()
        free, total = s.get("kv_free_blocks", 0), s.get("kv_total_blocks", 0)
        hits, misses = s.get("prefix_cache_hits", 0), s.get("prefix_cache_misses", 0)
        yield GaugeMetricFamily(f"{p}_requests_running", "Requests in the running batch", value=s.get("running", 0))
        yield GaugeMetricFamily(f"{p}_requests_waiting", "Requests queued for the batch", value=s.get("waiting", 0))
        yield GaugeMetricFamily(f"{p}_kv_blocks_used", "KV cache blocks held by requests", value=total - free)
        yield GaugeMetricFamily(f"{p}_kv_blocks_free", "KV cache blocks free (including evictable cached ones)",
                                value=free)
        yield GaugeMetricFamily(f"{p}_kv_blocks_total", "KV cache blocks in all", value=total)
        yield GaugeMetricFamily(f"{p}_kv_usage_ratio", "Fraction of KV cache blocks in use",
                                value=(total - free) / total if total else 0.0)
        yield CounterMetricFamily(f"{p}_prefix_cache_hits", "Prompt blocks served from the prefix cache", value=hits)
        yield CounterMetricFamily(f"{p}_prefix_cache_misses", "Prompt blocks computed (not in the prefix cache)",
                                  value=misses)
        yield GaugeMetricFamily(f"{p}_prefix_cache_hit_rate", "Prefix-cache hits / (hits + misses) since start",
                                value=hits / (hits + misses) if hits + misses else 0.0)
        yield CounterMetricFamily(f"{p}_engine_steps", "Engine steps run", value=s.get("steps", 0))
        # The frame budget: the governor's share of wall time for the engine, and the step time it sizes against.
        for family, name, help_text, key, default, scale in _SCALED_STATS:
            yield family(f"{p}_{name}", help_text, value=s.get(key, default) / scale)
        if "step_cost_fixed_us" in s:   # the step cost model, once it has learned this device's steps
            cost = GaugeMetricFamily(f"{p}_engine_step_cost_seconds", "The fitted step cost model: seconds per "
                                     "step, per prefill token, per decode row, per KV token read and per step "
                                     "that prefills at all",
                                     labels=["term"])
            cost.add_metric(["fixed"], s["step_cost_fixed_us"] / 1e6)
            cost.add_metric(["per_prefill_token"], s["step_cost_prefill_token_ns"] / 1e9)
            cost.add_metric(["per_decode_row"], s["step_cost_decode_row_ns"] / 1e9)
            cost.add_metric(["per_kv_token"], s["step_cost_kv_ktoken_ns"] / 1e12)
            cost.add_metric(["per_prefill_step"], s.get("step_cost_prefill_step_us", 0) / 1e6)
            yield cost


class RequestTracker:
    """One request seen by the metrics: wrap its ``on_event`` with `on_event`, or call `reject` if the
    engine refused it."""

    def __init__(self, metrics: Metrics, request_id: str, on_event: Callable[[StreamEvent], None] | None,
                 front_end: str, kind: str, preview: str) -> None:
        self.metrics = metrics
        self.request_id = request_id
        self.front_end = front_end
        self._inner = on_event
        self._last_token_at: float | None = None
        self._ended = False
        metrics.live.begin(request_id, front_end, kind, preview)

    def on_event(self, event: StreamEvent) -> None:
        """Runs on the engine thread: record, then hand on."""
        try:
            self._record(event)
        finally:
            if self._inner is not None:
                self._inner(event)

    def _record(self, event: StreamEvent) -> None:
        m = self.metrics
        now = time.perf_counter()
        n = len(event.token_ids)
        if n:
            if self._last_token_at is not None:
                gap = (now - self._last_token_at) / n
                for _ in range(n):
                    m.inter_token_latency.observe(gap)
            self._last_token_at = now
        m.live.add_text(self.request_id, event.text, n)
        result = event.result
        if result is None or self._ended:
            return
        self._ended = True
        outcome = result.finish_reason if result.finish_reason in OUTCOMES else "error"
        m.requests.labels(self.front_end, outcome).inc()
        m.prompt_tokens.labels(self.front_end).inc(result.usage.prompt_tokens)
        m.cached_prompt_tokens.labels(self.front_end).inc(result.usage.cached_tokens)
        m.completion_tokens.labels(self.front_end).inc(result.usage.completion_tokens)
        if result.timings.ttft_ms is not None:
            m.ttft.observe(result.timings.ttft_ms / 1000.0)
        m.queue_time.observe(result.timings.queued_ms / 1000.0)
        m.duration.observe(result.timings.total_ms / 1000.0)
        m.live.end(self.request_id, outcome, completion_tokens=result.usage.completion_tokens,
                   ttft_ms=result.timings.ttft_ms, error=result.error)

    def reject(self, reason: str = "rejected") -> None:
        """The engine refused the request before it started (bad input, too long, overloaded)."""
        if self._ended:
            return
        self._ended = True
        self.metrics.count_rejected(self.front_end, reason, live=False)
        self.metrics.live.end(self.request_id, "rejected", completion_tokens=0)


class Metrics:
    """The metrics registry of one engine (see the module docstring)."""

    def __init__(self, engine: EngineAPI | None = None, *, prefix: str = "gllm", live: LiveView | None = None) -> None:
        self.prefix = p = prefix
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.live = live or LiveView()
        self.engine: EngineAPI | None = None
        self.started = time.time()
        self.requests = Counter(f"{p}_requests", "Generation requests finished, by front end and outcome "
                                "(stop, length, cancelled, error, rejected)", ["front_end", "outcome"], registry=r)
        self.rejections = Counter(f"{p}_requests_rejected", "Requests refused before they started, by reason",
                                  ["front_end", "reason"], registry=r)
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens of finished requests", ["front_end"],
                                     registry=r)
        self.cached_prompt_tokens = Counter(f"{p}_prompt_tokens_cached",
                                            "Prompt tokens served by the prefix cache", ["front_end"], registry=r)
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated tokens of finished requests",
                                         ["front_end"], registry=r)
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Submission to first token",
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(f"{p}_inter_token_latency_seconds", "Time between a request's tokens",
                                             buckets=ITL_BUCKETS_S, registry=r)
        self.queue_time = Histogram(f"{p}_request_queue_seconds", "Submission to first scheduled step",
                                    buckets=TTFT_BUCKETS_S, registry=r)
        self.duration = Histogram(f"{p}_request_duration_seconds", "Submission to the end of a request",
                                  buckets=DURATION_BUCKETS_S, registry=r)
        self.step_time = Histogram(f"{p}_engine_step_seconds", "Wall time of one engine step",
                                   buckets=STEP_BUCKETS_S, registry=r)
        self.step_tokens = Counter(f"{p}_engine_computed_tokens", "Tokens computed by engine steps "
                                   "(prefill chunks and decodes)", registry=r)
        self.preemptions = Counter(f"{p}_engine_preemptions", "Sequences preempted to free KV blocks", registry=r)
        self.bridge_clients = Gauge(f"{p}_bridge_clients_connected", "ZeroMQ bridge sessions connected",
                                    registry=r)
        self.http_requests_in_flight = Gauge(f"{p}_http_requests_in_flight",
                                             "HTTP generation requests being answered", registry=r)
        self.info = Info(f"{p}_model", "The model served", registry=r)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: EngineAPI) -> None:
        """Subscribe to ``engine``'s steps and read its stats at scrape time (once per engine)."""
        if self.engine is engine:
            return
        if self.engine is not None:
            raise ValueError("this Metrics is already attached to another engine")
        self.engine = engine
        engine.add_step_listener(self._on_step)
        self.registry.register(_EngineCollector(engine, self.prefix))
        self.live.add_source("frame", lambda: frame_panel(engine.stats()))
        self.info.info({"model": str(engine.model_name), "device": str(engine.device)})

    def detach(self) -> None:
        """Stop listening to the engine's steps (the engine may outlive this front end)."""
        if self.engine is not None:
            self.engine.remove_step_listener(self._on_step)

    def _on_step(self, info: StepInfo) -> None:
        self.step_time.observe(info.seconds)
        self.step_tokens.inc(info.num_tokens)
        if info.num_preempted:
            self.preemptions.inc(info.num_preempted)
        self.live.on_step(info.seconds, info.num_tokens, info.num_decodes)

    def track(self, request_id: str, on_event: Callable[[StreamEvent], None] | None = None, *, front_end: str,
              kind: str = "", preview: str = "") -> RequestTracker:
        """Start tracking a request: pass ``tracker.on_event`` to ``engine.add_request``; call
        ``tracker.reject(reason)`` if that raised."""
        return RequestTracker(self, request_id, on_event, front_end, kind, preview)

    def count_rejected(self, front_end: str, reason: str, *, live: bool = True) -> None:
        """A request refused before it reached the engine (invalid body, unknown model, bad key)."""
        self.requests.labels(front_end, "rejected").inc()
        self.rejections.labels(front_end, reason).inc()
        if live:
            self.live.count_rejected(front_end)

    def set_bridge_clients(self, n: int) -> None:
        self.bridge_clients.set(n)
        self.live.bridge_clients = n

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def frame_panel(stats: dict) -> dict:
    """The dashboard's "Frame governor" panel from the engine's stats: empty (shown as not active) until the
    governor has acted or a step budget is set."""
    duty = stats.get("governor_duty_pct", 100)
    if duty >= 100 and not stats.get("governor_paused_ms") and not stats.get("governor_pressure_pct") \
            and not stats.get("step_budget_us"):
        return {}
    panel = {"duty": f"{duty} %", "paused": f"{stats.get('governor_paused_ms', 0) / 1000:.1f} s",
             "worst frame / target": f"{stats.get('governor_pressure_pct', 0) / 100:.2f}",
             "frames over 1.1x target": f"{stats.get('governor_frames_over_permille', 0) / 10:.1f} %",
             "step p50 / p99": f"{stats.get('step_p50_us', 0) / 1000:.1f} / "
                               f"{stats.get('step_p99_us', 0) / 1000:.1f} ms"}
    if stats.get("step_budget_us"):
        panel["step budget"] = f"{stats['step_budget_us'] / 1000:.1f} ms"
    return panel

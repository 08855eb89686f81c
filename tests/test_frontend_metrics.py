"""gllm.frontend.metrics: what the engine's stats become in /metrics and in the dashboard's frame panel (a stats
snapshot in, the Prometheus text and the panel out; the real server's /metrics is tested in test_serve.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from gllm.frontend.metrics import Metrics, frame_panel  # noqa: E402

STATS = {"kv_free_blocks": 30, "kv_total_blocks": 40, "running": 2, "waiting": 1, "steps": 500,
         "governor_duty_pct": 49, "governor_paused_ms": 2500, "compute_ms": 7000, "governor_pressure_pct": 131,
         "governor_frames_over_permille": 67, "step_p50_us": 4200, "step_p99_us": 9100, "step_budget_us": 8333,
         "step_cost_fixed_us": 1500, "step_cost_prefill_token_ns": 20000, "step_cost_decode_row_ns": 300000,
         "step_cost_kv_ktoken_ns": 2000}


class StatsOnly:
    """The part of EngineAPI the metrics read: its stats, its name and device, and step listeners."""
    model_name, device = "tiny", "cpu"

    def __init__(self, stats: dict) -> None:
        self.values = stats

    def stats(self) -> dict:
        return dict(self.values)

    def add_step_listener(self, listener) -> None:
        pass

    def remove_step_listener(self, listener) -> None:
        pass


def scrape(stats: dict) -> dict:
    text = Metrics(StatsOnly(stats)).exposition()[0].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_governor_and_step_figures_reach_metrics_in_base_units():
    m = scrape(STATS)
    assert m[("gllm_governor_duty_ratio", ())] == pytest.approx(0.49)
    assert m[("gllm_governor_paused_seconds_total", ())] == pytest.approx(2.5)
    assert m[("gllm_engine_compute_seconds_total", ())] == pytest.approx(7.0)
    assert m[("gllm_governor_frame_pressure_ratio", ())] == pytest.approx(1.31)
    assert m[("gllm_governor_frames_over_ratio", ())] == pytest.approx(0.067)
    assert m[("gllm_engine_step_p99_seconds", ())] == pytest.approx(0.0091)
    assert m[("gllm_engine_step_budget_seconds", ())] == pytest.approx(0.008333)
    assert m[("gllm_engine_step_cost_seconds", (("term", "per_decode_row"),))] == pytest.approx(300e-6)
    assert m[("gllm_engine_step_cost_seconds", (("term", "per_kv_token"),))] == pytest.approx(2e-9)   # 2 us a ktoken


def test_no_cost_model_no_cost_series_and_an_idle_governor_has_no_panel():
    idle = {k: v for k, v in STATS.items() if not k.startswith("step_cost")}
    idle.update(governor_duty_pct=100, governor_paused_ms=0, governor_pressure_pct=0, step_budget_us=0)
    assert not any(name == "gllm_engine_step_cost_seconds" for name, _ in scrape(idle))
    assert frame_panel(idle) == {}
    panel = frame_panel(STATS)
    assert panel["duty"] == "49 %" and panel["step budget"] == "8.3 ms" and panel["frames over 1.1x target"] == "6.7 %"

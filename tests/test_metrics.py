"""The metrics' own bookkeeping, without a server: the inference-time
histogram a version keeps, and the bounded ``model`` label."""

from __future__ import annotations

import math

from edge_agent.http.metrics import UNKNOWN_MODEL, AgentStats, Metrics
from edge_agent.models.servable import INFER_BUCKETS_S, ModelStats


def test_inference_histogram_is_cumulative_in_seconds() -> None:
    """Prometheus computes quantiles from cumulative buckets in seconds:
    a count in the wrong bucket, or milliseconds taken for seconds, gives
    dashboards a latency off by a factor of a thousand."""
    stats = ModelStats()
    for ms in (0.5, 3.0, 3.0, 40.0, 20000.0):
        stats.ok(ms)
    stats.error()
    buckets, total = stats.histogram()
    counts = dict(buckets)
    assert [b for b, _ in buckets] == [*INFER_BUCKETS_S, math.inf]
    assert counts[0.001] == 1 and counts[0.0025] == 1 and counts[0.005] == 3
    assert counts[0.025] == 3 and counts[0.05] == 4 and counts[10.0] == 4 and counts[math.inf] == 5
    assert math.isclose(total, 20.0465)
    assert stats.snapshot()[:2] == (5, 1)  # probation's reads are unchanged


class _Models:
    def status(self) -> dict:
        return {"cam_model": {"loaded": [3]}}

    def model_stats(self) -> dict:
        return {"cam_model": {"version": 3, "frames": 2, "errors": 0, "infer_ms_p50": 4.0}}

    def inference_histogram(self, name: str):
        return 3, [(0.005, 2), (math.inf, 2)], 0.008


def test_only_configured_models_get_a_label_of_their_own() -> None:
    """A client chooses the model name of a request; a series per name would
    grow the scrape (and Prometheus' memory) with every typo or scan."""
    metrics = Metrics(_Models(), lambda: AgentStats("dev", [], None))
    for name in ("cam_model", "junk1", "junk2", "../../etc"):
        metrics.observe_predict(name, 0.01)
    text = metrics.render()[0].decode()
    assert 'edge_agent_http_predict_seconds_count{model="cam_model"} 1.0' in text
    assert f'edge_agent_http_predict_seconds_count{{model="{UNKNOWN_MODEL}"}} 3.0' in text
    assert "junk" not in text and "etc" not in text
    assert 'edge_agent_model_inference_seconds_bucket{le="0.005",model="cam_model",version="3"} 2.0' in text
    assert 'edge_agent_model_inference_seconds_sum{model="cam_model",version="3"} 0.008' in text
    assert "inference_ms" not in text

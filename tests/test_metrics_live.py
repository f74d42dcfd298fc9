"""``GET /metrics`` of a real agent over real HTTP, as Prometheus and its
``promtool`` read it: a real MobileNetV2 (ONNX Runtime) fed by the demo
video, predict requests posted to the real server."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_http import agent_photo, call, jpeg_b64, start_agent

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(assets, mobilenet_bundle, tmp_path_factory):
    """An agent serving MobileNetV2 over HTTP, its camera the demo video."""
    agent, base = start_agent(
        tmp_path_factory.mktemp("metrics"),
        [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
        [{"name": "cam", "uri": str(assets["demo_video"]), "model": "mobilenet_v2", "loop": True, "fps": 10}],
    )
    yield agent, base
    agent.shutdown()


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items())))
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_client_supplied_model_names_do_not_create_series(served) -> None:
    """A client picks the model name in the URL: labelling metrics with it
    lets any client (a typo loop, a scanner) grow the scrape without bound
    and exhaust Prometheus' memory. Only configured models get a label of
    their own; every other name is counted under ``model="unknown"``."""
    agent, base = served
    call(base, "/v1/models/junk0:predict", {"instances": [[1.0]]})  # the "unknown" series exist from now on
    call(base, "/metrics")  # and the scrape's own counter
    before = _series(call(base, "/metrics")[1])
    for i in range(1, 21):
        status, body = call(base, f"/v1/models/junk{i}:predict", {"instances": [[1.0]]})
        assert status == 404, body
    status, text = call(base, "/metrics")
    assert status == 200
    after = _series(text)
    grown = {s for s in after - before if not s[0].startswith("process_")}
    assert grown == set(), sorted(grown)[:10]
    assert not any("junk" in v for _, labels in after for _, v in labels)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("edge_agent_http_predict_seconds_count", (("model", "unknown"),))] == 21

    status, _ = call(base, "/v1/models/mobilenet_v2:predict",
                     {"instances": [{"b64": jpeg_b64(agent_photo(agent, "coffee"))}]})
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(call(base, "/metrics")[1]) for s in fam.samples}
    assert samples[("edge_agent_http_predict_seconds_count", (("model", "mobilenet_v2"),))] >= 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (scripts/setup.sh dev installs it)")
def test_promtool_accepts_the_exposition(served) -> None:
    """Prometheus' own linter is what a user runs when a dashboard or an
    alert rule misbehaves: units spelt out (seconds, bytes), latencies as
    histograms, counters ending in ``_total``. The exposition of a live agent
    that has served frames and predicts (so every family has samples) passes."""
    agent, base = served
    assert call(base, "/v1/models/mobilenet_v2:predict",
                {"instances": [{"b64": jpeg_b64(agent_photo(agent, "coffee"))}]})[0] == 200
    call(base, "/v1/models/nope:predict", {"instances": [[1.0]]})
    status, text = call(base, "/metrics")
    assert status == 200
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"edge_agent_model_inference_seconds", "edge_agent_http_predict_seconds",
            "edge_agent_source_frames", "edge_agent_model_inferences"} <= names
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()

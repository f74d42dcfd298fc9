"""``GET /metrics`` of a real agent over real HTTP, as Prometheus and its
``promtool`` read it: a real MobileNetV2 (ONNX Runtime) fed by the demo
video, predict requests posted to the real server, over REST and gRPC."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_http import agent_photo, call, jpeg_b64

from edge_agent.agent import Agent
from edge_agent.config import parse_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(assets, mobilenet_bundle, tmp_path_factory):
    """An agent serving MobileNetV2 over HTTP and gRPC, its camera the demo video."""
    agent = Agent(parse_config({
        "device_id": "metrics-test", "log_level": "warning",
        "store": {"path": str(tmp_path_factory.mktemp("metrics") / "store")},
        "models": [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
        "sources": [{"name": "cam", "uri": str(assets["demo_video"]), "model": "mobilenet_v2", "loop": True,
                     "fps": 10}],
        "http": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "grpc": {"enabled": True, "host": "127.0.0.1", "port": 0},
    }))
    agent.start()
    host, port = agent.http.address
    yield agent, f"http://{host}:{port}"
    agent.shutdown()


def _grpc_predict(agent, name: str) -> str:
    """One gRPC Predict of a zero image to ``name``; the status code's name."""
    import grpc
    import numpy as np

    from edge_agent.grpc import tensors
    from edge_agent.grpc.protos import predict_pb2, prediction_service_pb2_grpc

    _, signature = agent.predictor.resolve("mobilenet_v2")
    (key, info), = signature.inputs.items()
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.inputs[key].CopyFrom(tensors.from_numpy(np.zeros([1 if d < 0 else d for d in info.shape], np.float32)))
    host, port = agent.grpc.address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(req, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_grpc_predicts_are_counted_as_rest_ones_are(served) -> None:
    """An operator watching request rates and latencies must see the gRPC
    traffic too (the clients that care most about throughput use it), and a
    gRPC client naming models at random must not grow the scrape either:
    calls counted by method and status code, Predict time by model, only
    configured names as labels, the rest under ``model="unknown"``."""
    agent, base = served
    assert _grpc_predict(agent, "junk0") == "NOT_FOUND"  # the "unknown" series exist from now on
    call(base, "/metrics")  # and the scrape's own counter
    counted = _samples(call(base, "/metrics")[1])
    for i in range(1, 21):
        assert _grpc_predict(agent, f"junk{i}") == "NOT_FOUND"
    text = call(base, "/metrics")[1]
    grown = {s for s in _series(text) - set(counted) if not s[0].startswith("process_")}
    assert grown == set(), sorted(grown)[:10]
    assert not any("junk" in v for _, labels in _series(text) for _, v in labels)
    samples = _samples(text)
    unknown = ("edge_agent_grpc_predict_seconds_count", (("model", "unknown"),))
    assert samples[unknown] - counted[unknown] == 20
    not_found = ("edge_agent_grpc_requests_total", (("code", "NOT_FOUND"), ("method", "Predict")))
    assert samples[not_found] - counted[not_found] == 20
    assert _grpc_predict(agent, "mobilenet_v2") == "OK"
    samples = _samples(call(base, "/metrics")[1])
    assert samples[("edge_agent_grpc_predict_seconds_count", (("model", "mobilenet_v2"),))] >= 1
    assert samples[("edge_agent_grpc_requests_total", (("code", "OK"), ("method", "Predict")))] >= 1


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
    assert _grpc_predict(agent, "mobilenet_v2") == "OK" and _grpc_predict(agent, "nope") == "NOT_FOUND"
    status, text = call(base, "/metrics")
    assert status == 200
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {"edge_agent_model_inference_seconds", "edge_agent_http_predict_seconds",
            "edge_agent_grpc_predict_seconds", "edge_agent_grpc_requests",
            "edge_agent_source_frames", "edge_agent_model_inferences"} <= names
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()

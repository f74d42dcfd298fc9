"""The HTTP API as a pure request -> response layer (edge_agent.http.api),
without a socket: the collaborators the agent hands it are plain fakes."""

from __future__ import annotations

from typing import Any

from edge_agent.http.api import Api, ApiError, Request, Response
from edge_agent.http.metrics import AgentStats, SourceStats


class FakeModels:
    """The manager's reads, for one model ``m`` with version 1 installed, not loaded."""

    def __init__(self) -> None:
        self.broken = False

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("store gone")
        return {"m": {"versions": [1], "labels": {}, "loaded": [], "failed": {}}}

    def model_stats(self) -> dict[str, dict[str, Any]]:
        return {"m": {"version": None}}

    def inference_histogram(self, name: str) -> None:
        return None  # no version serves

    def acquire(self, name: str, label: str | None = None, version: int | None = None) -> Any:
        raise AssertionError("no request here reaches a model")


def make_api(mqtt: bool | None = None) -> tuple[Api, FakeModels]:
    models = FakeModels()
    stats = AgentStats(device_id="dev", sources=[SourceStats("cam", frames=5, errors=1, captured=9, skipped=3,
                                                             up=True)], mqtt_connected=mqtt)
    return Api(models, ready=lambda: (False, ["model m: no version loaded"]), stats=lambda: stats), models


def get(api: Api, method: str, target: str, body: bytes | None = None) -> tuple[Response, list[int]]:
    reads: list[int] = []

    def read() -> bytes:
        reads.append(1)
        if body is None:
            raise ApiError(411, "a Content-Length header is required")
        return body

    return api.handle(Request(method, target, {}, read)), reads


def test_health_readiness_and_status_answer_as_json() -> None:
    api, _ = make_api()
    resp, _ = get(api, "GET", "/healthz")
    assert (resp.status, resp.headers, resp.body) == (200, (("Content-Type", "application/json"),),
                                                      b'{"status":"alive"}')
    resp, _ = get(api, "GET", "/readyz")
    assert (resp.status, resp.body) == (503, b'{"ready":false,"problems":["model m: no version loaded"]}')
    resp, _ = get(api, "GET", "/v1/models/m?x=1")
    assert resp.status == 200 and resp.body == (b'{"model_version_status":[{"version":"1","state":"END",'
                                                b'"status":{"error_code":"OK","error_message":""}}]}')
    resp, _ = get(api, "GET", "/v1/models/%6D/versions/2")  # the path is percent-decoded
    # TF Serving's GetModelStatus words, the same as the gRPC API's (one serving core answers both)
    assert (resp.status, resp.body) == (404, b'{"error":"Could not find version 2 of model m"}')
    resp, _ = get(api, "GET", "/v1/models/junk")
    assert (resp.status, resp.body) == (404, b'{"error":"Could not find any versions of model junk"}')


def test_a_refused_request_never_reads_its_body() -> None:
    api, _ = make_api()
    for method, target, status in (("POST", "/healthz", 405), ("POST", "/v1/models/m", 405),
                                   ("GET", "/v1/models/m:predict", 405), ("POST", "/v2/x", 404)):
        resp, reads = get(api, method, target, b"{}")
        assert resp.status == status and reads == [], (method, target)


def test_a_body_that_cannot_be_read_is_the_answer_and_counted() -> None:
    api, _ = make_api()
    resp, reads = get(api, "POST", "/v1/models/m:predict")
    assert reads == [1] and (resp.status, resp.body) == (411, b'{"error":"a Content-Length header is required"}')
    resp, _ = get(api, "POST", "/v1/models/m:predict", b"{nope")
    assert resp.status == 400 and b"not valid JSON" in resp.body
    text = get(api, "GET", "/metrics")[0].body.decode()
    assert 'edge_agent_http_requests_total{code="411",endpoint="predict"} 1.0' in text
    assert 'edge_agent_http_requests_total{code="400",endpoint="predict"} 1.0' in text
    assert 'edge_agent_http_predict_seconds_count{model="m"} 2.0' in text


def test_a_bug_answers_500_and_is_counted() -> None:
    api, models = make_api()
    models.broken = True
    resp, _ = get(api, "GET", "/v1/models/m")
    assert (resp.status, resp.body) == (500, b'{"error":"internal error: RuntimeError: store gone"}')
    models.broken = False
    text = get(api, "GET", "/metrics")[0].body.decode()
    assert 'edge_agent_http_requests_total{code="500",endpoint="status"} 1.0' in text


def test_metrics_read_the_stats_callable_at_each_scrape() -> None:
    from edge_agent import __version__

    for mqtt, line in ((True, "edge_agent_mqtt_connected 1.0"), (False, "edge_agent_mqtt_connected 0.0"),
                       (None, None)):
        api, _ = make_api(mqtt)
        resp, _ = get(api, "GET", "/metrics")
        assert resp.status == 200 and resp.headers[0][0] == "Content-Type" and "text/plain" in resp.headers[0][1]
        text = resp.body.decode()
        assert f'edge_agent_info{{device_id="dev",version="{__version__}"}} 1.0' in text
        for sample in ('edge_agent_source_frames_total{source="cam"} 5.0',
                       'edge_agent_source_errors_total{source="cam"} 1.0',
                       'edge_agent_source_captured_frames_total{source="cam"} 9.0',
                       'edge_agent_source_skipped_frames_total{source="cam"} 3.0',
                       'edge_agent_source_up{source="cam"} 1.0',
                       'edge_agent_model_active_version{model="m"} 0.0',
                       'edge_agent_model_loaded_versions{model="m"} 0.0'):
            assert sample in text, sample
        if line is None:
            assert "edge_agent_mqtt_connected" not in text
        else:
            assert line in text


def test_json_nested_past_the_stack_is_a_400_not_a_500() -> None:
    """A body of 100 000 nested brackets (15 bytes of curl) made json.loads raise RecursionError, answered
    500 with a traceback in the log per request: a client's malformed body must be its 400, counted as such."""
    api, _ = make_api()
    body = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp, _ = get(api, "POST", "/v1/models/m:predict", body)
    assert resp.status == 400
    assert b"JSON Parse error: the body nests arrays or objects too deeply" in resp.body


def test_lists_nested_deeper_than_a_tensor_say_so() -> None:
    """900 nested lists around one number are rectangular; numpy refuses them for their rank, and the
    answer must say that, not that the lists are ragged."""
    import pytest

    from edge_agent.http import rest
    from edge_agent.serving import ServingError, TensorInfo

    value: Any = 1.0
    for _ in range(900):
        value = [value]
    with pytest.raises(ServingError, match="nest 900 levels deep: too many dimensions"):
        rest.to_array(value, TensorInfo("x", "float32", [-1]))

"""The local HTTP API (CONTRACT §5) of a real agent: the real MobileNetV2
(ONNX Runtime) and BlazeFace (LiteRT), the real demo video as a camera, real
photos posted as JPEG, over real HTTP on a loopback port."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import CAT_CLASSES
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from waiting import let_time_pass, poll_until, wait_until

pytestmark = pytest.mark.integration


def call(base: str, path: str, body: Any = None, *, raw: bytes | None = None, method: str | None = None
         ) -> tuple[int, Any]:
    """One request; the status and the decoded JSON (or text) answer."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, text, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, text, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    return status, json.loads(text) if "json" in ctype else text.decode()


def jpeg_b64(path: Path) -> str:
    ok, buf = cv2.imencode(".jpg", cv2.imread(str(path)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def start_agent(tmp: Path, models: list[dict], sources: list[dict], **http: Any) -> tuple[Agent, str]:
    cfg = parse_config({
        "device_id": "http-test",
        "log_level": "warning",
        "store": {"path": str(tmp / "store")},
        "models": models,
        "sources": sources,
        "http": {"enabled": True, "host": "127.0.0.1", "port": 0, **http},
    })
    agent = Agent(cfg)
    agent.start()
    assert agent.http is not None
    host, port = agent.http.address
    return agent, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def served(assets, mobilenet_bundle, blazeface_bundle, tmp_path_factory):
    """An agent serving MobileNetV2 (fed by the demo video) and BlazeFace."""
    agent, base = start_agent(
        tmp_path_factory.mktemp("http"),
        [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1},
         {"name": "blazeface", "bundle": str(blazeface_bundle), "threads": 1}],
        [{"name": "cam", "uri": str(assets["demo_video"]), "model": "mobilenet_v2", "loop": True, "fps": 10}],
        max_body_mb=8,
    )
    yield agent, base
    agent.shutdown()


def test_model_status_and_metadata_in_tf_serving_shape(served) -> None:
    agent, base = served
    status, body = call(base, "/v1/models/mobilenet_v2")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]}
    assert call(base, "/v1/models/mobilenet_v2/versions/1")[1] == body

    status, meta = call(base, "/v1/models/mobilenet_v2/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "mobilenet_v2", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (inp,) = sig["inputs"].values()
    assert inp["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in inp["tensor_shape"]["dim"]] == ["1", "3", "224", "224"]
    (out,) = sig["outputs"].values()
    assert out["tensor_shape"]["dim"][-1]["size"] == "1000"
    assert meta["edge_agent"]["task"] == "classify" and meta["edge_agent"]["labels"] == 1000
    assert meta["edge_agent"]["preprocessing"]["resize"] == "crop"

    status, face_meta = call(base, "/v1/models/blazeface/metadata")
    assert status == 200 and face_meta["edge_agent"]["runtime"] == "tflite"
    assert len(face_meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["outputs"]) == 2


def test_labels_and_versions_resolve_like_tf_serving(served) -> None:
    agent, base = served
    status, body = call(base, "/v1/models/mobilenet_v2/labels/stable")
    assert status == 404 and "stable" in body["error"]
    agent.models.set_label("mobilenet_v2", "stable", 1)
    try:
        status, body = call(base, "/v1/models/mobilenet_v2/labels/stable")
        assert status == 200 and body["model_version_status"][0]["version"] == "1"
        status, body = call(base, "/v1/models/mobilenet_v2/labels/stable:predict",
                            {"instances": [{"b64": jpeg_b64(agent_photo(agent, "chelsea"))}]})
        assert status == 200 and body["model_spec"] == {"name": "mobilenet_v2", "version": "1"}
    finally:
        agent.models.set_label("mobilenet_v2", "stable", None)
    status, body = call(base, "/v1/models/mobilenet_v2/versions/7")
    assert status == 404 and "version 7" in body["error"]
    status, body = call(base, "/v1/models/mobilenet_v2/versions/x:predict", {"instances": [[0]]})
    assert status == 400 and "integer" in body["error"]
    status, body = call(base, "/v1/models/nope")
    assert status == 404 and "nope" in body["error"]


def agent_photo(agent: Agent, name: str) -> Path:
    """A real photo of the cached assets (DATA.md)."""
    import testassets

    return testassets.default_cache_dir() / "photos" / f"{name}.jpg"


def test_predict_a_jpeg_a_tensor_and_columnar_give_the_same_answer(served, mobilenet) -> None:
    agent, base = served
    photo = agent_photo(agent, "chelsea")
    b64 = jpeg_b64(photo)
    status, body = call(base, "/v1/models/mobilenet_v2:predict", {"instances": [{"b64": b64}]})
    assert status == 200, body
    (logits,) = body["predictions"]
    assert len(logits) == 1000
    top = body["results"][0]["top"]
    assert top[0]["label"] in CAT_CLASSES
    assert int(np.argmax(logits)) == top[0]["index"]

    # The same picture as the agent would preprocess a camera frame, sent as
    # a tensor (row format, named input), and columnar.
    frame = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
    tensor, _ = mobilenet.preprocess(frame)
    name = mobilenet.manifest.inputs[0].name
    status, rows = call(base, "/v1/models/mobilenet_v2:predict", {"instances": [{name: tensor[0].tolist()}]})
    assert status == 200, rows
    np.testing.assert_allclose(rows["predictions"][0], logits, atol=1e-3)
    status, cols = call(base, "/v1/models/mobilenet_v2:predict", {"inputs": {name: [tensor[0].tolist()] * 2}})
    assert status == 200, cols
    assert np.asarray(cols["outputs"]).shape == (2, 1000)
    np.testing.assert_allclose(cols["outputs"][1], logits, atol=1e-3)
    assert "predictions" not in cols  # TF Serving answers the columnar format with "outputs" only (issue 15)

    # Several pictures in one request, each answered in order.
    coffee = jpeg_b64(agent_photo(agent, "coffee"))
    status, both = call(base, "/v1/models/mobilenet_v2:predict", {"instances": [{"b64": coffee}, {"b64": b64}]})
    assert status == 200
    assert both["results"][0]["top"][0]["label"] == "espresso"
    assert both["results"][1]["top"][0]["label"] == top[0]["label"]


def test_instances_of_a_dynamic_batch_model_run_as_one_batch(assets, tmp_path) -> None:
    """A model whose batch dimension is dynamic answers a request's
    instances (tensors and pictures mixed) in one runtime call, with the
    same answers as one at a time; a batch-1 model runs them in turn."""
    from edge_agent.bundles.pack import pack
    from edge_agent.testing import tiny_onnx_classifier

    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")
    models = []
    for name, batch in (("dyn", "N"), ("one", 1)):
        onnx_path = tiny_onnx_classifier(tmp_path / f"{name}.onnx", size=(8, 8), classes=4, batch=batch)
        bundle = pack(onnx_path, name=name, version=1, out=tmp_path / f"{name}-bundle", labels=labels,
                      preprocessing={"size": (8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
        models.append({"name": name, "bundle": str(bundle), "threads": 1})
    agent, base = start_agent(tmp_path, models, [])
    try:
        # Real photos: four preprocessed by the client (the agent's own
        # preprocessing, as a client library would), one sent as a JPEG.
        with agent.models.acquire("dyn") as model:
            instances: list[Any] = [model.preprocess(cv2.imread(str(assets["photos"] / f"{name}.jpg")))[0][0].tolist()
                                    for name in ("chelsea", "dog", "eagle", "kite")]
        instances.insert(2, {"b64": jpeg_b64(assets["photos"] / "coffee.jpg")})
        singles = []
        for inst in instances:
            status, body = call(base, "/v1/models/dyn:predict", {"instances": [inst]})
            assert status == 200 and body["batch_size"] == 1
            singles.append(body["predictions"][0])
        status, batched = call(base, "/v1/models/dyn:predict", {"instances": instances})
        assert status == 200 and batched["batch_size"] == 5, batched
        np.testing.assert_allclose(batched["predictions"], singles, rtol=1e-5, atol=1e-5)
        assert [r["top"][0]["index"] for r in batched["results"]] == [int(np.argmax(s)) for s in singles]
        status, one = call(base, "/v1/models/one:predict", {"instances": instances})
        assert status == 200 and one["batch_size"] == 1 and len(one["predictions"]) == 5
        assert agent.models.model_stats()["dyn"]["frames"] == 10  # counted per instance, batched or not
    finally:
        agent.shutdown()


def test_predict_on_a_tflite_detector_maps_boxes_to_the_picture(served) -> None:
    agent, base = served
    photo = agent_photo(agent, "astronaut")
    status, body = call(base, "/v1/models/blazeface:predict", {"inputs": {"b64": jpeg_b64(photo)}})
    assert status == 200, body
    # columnar: TF Serving's "outputs" (by output name), no "predictions" (both were answered before issue 15)
    assert set(body["outputs"]) == {t.name for t in _manifest(agent, "blazeface").outputs}
    assert "predictions" not in body
    (faces,) = [r["detections"] for r in body["results"]]
    assert len(faces) == 1 and faces[0]["score"] > 0.5
    x0, y0, x1, y1 = faces[0]["box"]
    h, w = cv2.imread(str(photo)).shape[:2]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h  # picture pixels, not the 128x128 input


def _manifest(agent: Agent, name: str):
    with agent.models.acquire(name) as model:
        return model.manifest


def test_bad_requests_get_a_clear_error_and_serving_goes_on(served) -> None:
    agent, base = served
    url = "/v1/models/mobilenet_v2:predict"
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"instances": [], "inputs": []}).encode(), 400, "not both"),
        # signature_name was ignored before issue 15 ("x" reached the "instances" check): refused as TF Serving does
        (json.dumps({"signature_name": "x"}).encode(), 400, 'Serving signature name: "x" not found'),
        (json.dumps({"signature_name": "serving_default"}).encode(), 400, '"instances"'),
        (json.dumps({"instances": []}).encode(), 400, "no instances"),
        (json.dumps({"instances": {"b64": "x"}}).encode(), 400, "must be a list"),
        (json.dumps({"instances": [{"b64": "%%%"}]}).encode(), 400, "base64"),
        (json.dumps({"instances": [{"b64": base64.b64encode(b"not a picture").decode()}]}).encode(), 400,
         "not a picture"),
        (json.dumps({"instances": [[[0.0] * 4] * 4]}).encode(), 400, "shape [4, 4]"),
        (json.dumps({"instances": [["a"]]}).encode(), 400, "numeric tensor"),
        (json.dumps({"instances": [[0]] * 65}).encode(), 400, "at most 64"),
        (json.dumps({"inputs": {"wrong": [[0]]}}).encode(), 400, "the model has one input"),
        (b"x" * 9_000_000, 413, "at most 8000000"),
    ]
    for raw, want, words in cases:
        status, body = call(base, url, raw=raw)
        assert status == want and words in body["error"], (raw[:40], status, body)
    status, body = call(base, url, method="GET")
    assert status == 405 and "POST" in body["error"]
    status, body = call(base, "/v2/anything")
    assert status == 404 and "no endpoint" in body["error"]

    frames = agent.workers[0].stats.frames
    status, body = call(base, url, {"instances": [{"b64": jpeg_b64(agent_photo(agent, "chelsea"))}]})
    assert status == 200 and body["results"][0]["top"][0]["label"] in CAT_CLASSES
    poll_until(lambda: agent.workers[0].stats.frames > frames, 10, interval=0.05)
    assert agent.workers[0].stats.frames > frames, "the camera stopped while the API answered errors"


def test_a_refused_body_is_not_read_as_the_next_request_on_a_kept_alive_connection(served) -> None:
    import http.client

    agent, base = served
    host, port = agent.http.address
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        # POST where only GET is allowed: refused before its body is read.
        body = b'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'  # would be a request if it were left unread
        conn.request("POST", "/v1/models/mobilenet_v2", body=body, headers={"Content-Type": "text/plain"})
        first = conn.getresponse()
        assert first.status == 405 and b"use GET" in first.read()
        assert first.getheader("Connection") == "close"  # the server drops the connection, body and all
        conn.request("GET", "/v1/models/mobilenet_v2")  # http.client reconnects
        second = conn.getresponse()
        assert second.status == 200 and json.loads(second.read())["model_version_status"]
        assert second.getheader("Connection") is None
        sock = conn.sock
        conn.request("GET", "/healthz")  # a normal answer keeps the connection alive
        third = conn.getresponse()
        assert third.status == 200 and json.loads(third.read()) == {"status": "alive"}
        assert conn.sock is sock
    finally:
        conn.close()


def test_an_idle_connection_is_closed_after_idle_timeout(assets, mobilenet_bundle, tmp_path) -> None:
    agent, base = start_agent(tmp_path, [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
                              [], idle_timeout_s=0.5)
    try:
        host, port = agent.http.address
        with socket.create_connection((host, port), timeout=10) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and then nothing: a stalled client
            t0 = time.monotonic()
            assert idle.recv(1024) == b""  # the server hung up
            assert 0.3 < time.monotonic() - t0 < 5
        assert call(base, "/healthz")[0] == 200
    finally:
        agent.shutdown()


def test_health_readiness_and_prometheus_metrics(served) -> None:
    agent, base = served
    assert call(base, "/healthz") == (200, {"status": "alive"})
    assert call(base, "/readyz") == (200, {"ready": True, "problems": []})
    call(base, "/v1/models/mobilenet_v2:predict", {"instances": [{"b64": jpeg_b64(agent_photo(agent, "coffee"))}]})
    assert call(base, "/v1/models/mobilenet_v2:predict", {"instances": []})[0] == 400
    status, text = call(base, "/metrics")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("edge_agent_source_frames_total", (("source", "cam"),))] > 0
    assert samples[("edge_agent_source_up", (("source", "cam"),))] == 1
    assert samples[("edge_agent_model_active_version", (("model", "mobilenet_v2"),))] == 1
    assert samples[("edge_agent_model_inferences_total", (("model", "mobilenet_v2"), ("version", "1")))] > 0
    assert samples[("edge_agent_http_requests_total", (("code", "200"), ("endpoint", "predict")))] >= 1
    assert samples[("edge_agent_http_requests_total", (("code", "400"), ("endpoint", "predict")))] >= 1
    assert samples[("edge_agent_http_predict_seconds_count", (("model", "mobilenet_v2"),))] >= 1
    assert samples[("process_resident_memory_bytes", ())] > 10e6
    assert ("edge_agent_info", (("device_id", "http-test"), ("version", __import__("edge_agent").__version__))) \
        in samples


def test_readiness_names_what_is_missing(assets, mobilenet_bundle, tmp_path) -> None:
    agent, base = start_agent(
        tmp_path,
        [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
        [{"name": "cam", "uri": str(assets["demo_video"]), "model": "mobilenet_v2", "fps": 5, "loop": True},
         {"name": "gone", "uri": str(tmp_path / "missing.avi"), "model": "mobilenet_v2"}],
    )
    try:
        answers: list[tuple[int, Any]] = []

        def not_ready() -> bool:
            answers.append(call(base, "/readyz"))
            return answers[-1][0] == 503

        poll_until(not_ready, 10, interval=0.1)
        status, body = answers[-1]
        assert status == 503 and body["ready"] is False
        assert any(p.startswith("source gone:") for p in body["problems"]), body
        assert call(base, "/healthz")[0] == 200
    finally:
        agent.shutdown()


def test_a_hot_swap_fails_no_request(assets, mobilenet_bundle, tmp_path) -> None:
    from edge_agent.bundles.pack import pack
    from edge_agent.models.lifecycle import deploy

    agent, base = start_agent(tmp_path, [{"name": "mobilenet_v2", "bundle": str(mobilenet_bundle), "threads": 1}],
                              [])
    with (mobilenet_bundle / "manifest.json").open() as f:
        m = json.load(f)
    v2 = pack(mobilenet_bundle / m["model_file"], name="mobilenet_v2", version=2, out=tmp_path / "v2",
              preprocessing=m["preprocessing"], labels=mobilenet_bundle / m["labels"])
    b64 = jpeg_b64(agent_photo(agent, "chelsea"))
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, body = call(base, "/v1/models/mobilenet_v2:predict", {"instances": [{"b64": b64}]})
            answers.append((status, body.get("model_spec", {}).get("version", body.get("error"))))

    threads = [threading.Thread(target=client) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(answers) >= 4, 30, "the clients are answered (by version 1)")
        deploy(agent.models, v2)
        poll_until(lambda: any(v == "2" for _, v in answers[-4:]), 20, interval=0.05)
        let_time_pass(0.3, "the clients go on asking version 2 a little")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        agent.shutdown()
    assert answers and all(s == 200 for s, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [v for _, v in answers]
    assert "1" in versions and versions[-1] == "2"


def test_a_taken_port_stops_the_agent_with_a_clear_message(tmp_path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "x"\n[store]\npath = "{tmp_path / "store"}"\n'
                      f'[http]\nenabled = true\nport = {port}\n')
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_reload_restarts_the_api_with_its_new_settings(tmp_path) -> None:
    """SIGHUP's path (Agent.reload): a changed ``[http]`` restarts the server
    with it; settings it cannot serve with are refused and the running API
    comes back; ``enabled = false`` turns it off."""
    from edge_agent.errors import ConfigError

    agent, base = start_agent(tmp_path, [], [])

    def config(**http: Any) -> Any:
        return parse_config({"device_id": "http-test", "log_level": "warning",
                             "store": {"path": str(tmp_path / "store")},
                             "http": {"enabled": True, "host": "127.0.0.1", "port": 0, **http}})

    try:
        first = agent.http
        assert call(base, "/v1/models/m:predict", raw=b"x" * 2000)[0] == 400  # read (32 MB allowed): not JSON
        assert agent.reload(config(max_body_mb=0.001)) == ["http restarted"]
        assert agent.http is not first
        host, port = agent.http.address
        base = f"http://{host}:{port}"
        status, body = call(base, "/v1/models/m:predict", raw=b"x" * 2000)
        assert status == 413 and "at most 1000" in body["error"]
        assert call(base, "/readyz") == (200, {"ready": True, "problems": []})

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            with pytest.raises(ConfigError, match="cannot serve on"):
                agent.reload(config(port=taken.getsockname()[1]))
        finally:
            taken.close()
        host, port = agent.http.address  # the running settings, serving again
        assert call(f"http://{host}:{port}", "/healthz") == (200, {"status": "alive"})
        assert call(f"http://{host}:{port}", "/v1/models/m:predict", raw=b"x" * 2000)[0] == 413

        assert agent.reload(config(enabled=False)) == ["http off"]
        assert agent.http is None
    finally:
        agent.shutdown()

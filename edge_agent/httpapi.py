"""The local HTTP API: a TensorFlow Serving compatible subset (CONTRACT §5).

Served by the running agent on ``[http] host:port`` (default
127.0.0.1:8501) with the standard library's threading HTTP server, one
thread per connection, so a slow client never holds up another:

``GET /v1/models/<name>`` (``/versions/<v>``, ``/labels/<l>``)
    model status in TF Serving's shape: ``model_version_status``, one entry
    per version in the store (``AVAILABLE`` while loaded, ``END`` when it is
    installed but not loaded; a version that failed its checks says why).
``GET /v1/models/<name>[/versions/<v>|/labels/<l>]/metadata``
    ``model_spec`` and the ``serving_default`` signature (input and output
    names, dtypes, shapes), plus ``edge_agent``: task, runtime,
    preprocessing, labels, the way the agent runs the model.
``POST /v1/models/<name>[/versions/<v>|/labels/<l>]:predict``
    ``{"instances": [...]}`` (row format) or ``{"inputs": ...}`` (columnar).
    An instance is ``{"b64": "<JPEG or PNG>"}``, decoded and preprocessed
    exactly as camera frames are, or an already preprocessed tensor (nested
    lists, the model input's shape without the batch axis). The answer is
    ``{"predictions": [...]}``: per instance the model's raw output (a list,
    or an object by output name when the model has several); columnar
    requests also get TF Serving's ``outputs``. As an extension each answer
    carries ``model_spec`` (the version that answered) and ``results``: per
    instance what a camera frame would have published (top classes with
    labels, or detections in the picture's pixels).
``GET /healthz``, ``GET /readyz``, ``GET /metrics``
    alive; ready (every model has a loaded version and every source runs);
    Prometheus text format.

Errors are ``{"error": "<message>"}`` with a 4xx/5xx status, as TF Serving
answers them. Inference goes through the model manager's ``acquire``, the
same per-request handle frames use, so a hot swap never fails a request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Iterator, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np

from edge_agent import __version__
from edge_agent.errors import EdgeAgentError, ModelNotAvailable

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.models.manager import ModelManager
    from edge_agent.models.servable import LoadedModel


class Agent(Protocol):
    """What the HTTP API reads of the running agent (edge_agent.agent.Agent
    is one): its config, the model manager it serves through, the
    per-source workers (readiness, metrics) and the MQTT transport (its
    connection, for a metric). Read only; the API changes nothing of it."""

    config: "AgentConfig"
    models: "ModelManager"
    workers: list[Any]
    transport: Any

log = logging.getLogger(__name__)

MAX_INSTANCES = 64  # per predict request; more is a 400, not a stalled camera loop

#: /v1/models/<name>[/versions/<v>|/labels/<l>][/metadata | :predict]
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<what>/metadata|:predict)?/?$"
)

_PLAIN_PATHS = ("/healthz", "/readyz", "/metrics")
_ENDPOINTS = {":predict": "predict", "/metadata": "metadata", None: "status"}  # the metrics' endpoint label

_TF_DTYPES = {
    "float32": "DT_FLOAT", "float16": "DT_HALF", "int8": "DT_INT8", "uint8": "DT_UINT8",
    "int32": "DT_INT32", "int64": "DT_INT64",
}


class ApiError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status``."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the API, independent of the HTTP plumbing --------------------------------


class Api:
    """What each endpoint answers, given the agent (models, sources, plane)."""

    def __init__(self, agent: "Agent", *, max_instances: int = MAX_INSTANCES) -> None:
        self.agent = agent
        self.max_instances = max_instances
        self.metrics = Metrics(agent)
        self._models = {m.name for m in agent.config.models}  # the manager serves exactly these

    # model status -------------------------------------------------------

    def _status(self, name: str) -> dict[str, Any]:
        """The manager's status of one configured model (404 for another)."""
        if name not in self._models:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Servable not found for request: model {name!r} is not served here")
        return self.agent.models.status()[name]

    def _version(self, name: str, version: str | None, label: str | None,
                 status: dict[str, Any] | None = None) -> int | None:
        """The version a path names (None: the active one). The store is
        looked at only when the path names a version or a label: a plain
        predict goes straight to the serving model."""
        if version is None and label is None:
            if name not in self._models:
                self._status(name)  # raises the 404
            return None
        status = status or self._status(name)
        if label is not None:
            if label not in status["labels"]:
                raise ApiError(HTTPStatus.NOT_FOUND, f"model {name!r} has no version labelled {label!r}")
            return int(status["labels"][label])
        try:
            v = int(version)  # type: ignore[arg-type]
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"version {version!r} is not an integer") from None
        if v not in status["versions"]:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model {name!r} has no version {v}")
        return v

    def model_status(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        status = self._status(name)
        wanted = self._version(name, version, label, status)
        versions = [wanted] if wanted is not None else sorted(status["versions"], reverse=True)
        entries = []
        for v in versions:
            failed = status["failed"].get(str(v))
            if v in status["loaded"]:
                state, code, message = "AVAILABLE", "OK", ""
            elif failed:
                state, code, message = "END", "FAILED_PRECONDITION", str(failed)
            else:
                state, code, message = "END", "OK", ""
            entries.append({"version": str(v), "state": state, "status": {"error_code": code, "error_message": message}})
        return {"model_version_status": entries}

    def metadata(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        with self._acquire(name, version, label) as model:
            m = model.manifest
            labels = model.postprocess.labels
            return {
                "model_spec": {"name": name, "signature_name": "", "version": str(model.version)},
                "metadata": {"signature_def": {"signature_def": {"serving_default": {
                    "inputs": {t.name: _tensor_info(t) for t in model.runtime.inputs},
                    "outputs": {t.name: _tensor_info(t) for t in m.outputs},
                    "method_name": "tensorflow/serving/predict",
                }}}},
                "edge_agent": {
                    "task": m.task,
                    "runtime": m.runtime,
                    "preprocessing": m.preprocessing.model_dump(mode="json"),
                    "postprocessing": m.postprocessing.model_dump(mode="json"),
                    "labels": len(labels) if labels else 0,
                    "created_by": m.created_by,
                },
            }

    # predict ------------------------------------------------------------

    def predict(self, name: str, version: str | None, label: str | None, body: bytes) -> dict[str, Any]:
        request = _parse_json(body)
        if not isinstance(request, dict) or ("instances" in request) == ("inputs" in request):
            raise ApiError(HTTPStatus.BAD_REQUEST, 'the body must be an object with "instances" (row format) '
                           'or "inputs" (columnar), not both')
        columnar = "inputs" in request
        with self._acquire(name, version, label) as model:
            instances = _instances(request, model, columnar)
            if not instances:
                raise ApiError(HTTPStatus.BAD_REQUEST, "no instances to predict")
            if len(instances) > self.max_instances:
                raise ApiError(HTTPStatus.BAD_REQUEST,
                               f"{len(instances)} instances in one request; at most {self.max_instances}")
            prepared = [_prepare(model, instance, i) for i, instance in enumerate(instances)]
            batch = len(prepared) if _batches(model) else 1
            if batch > 1:
                rows = _split(self._infer(model, np.concatenate([t for t, _ in prepared]), "the batch"), batch)
            else:
                rows = [self._infer(model, t, f"instance {i}") for i, (t, _) in enumerate(prepared)]
            results = [model.postprocess(out, transform) for out, (_, transform) in zip(rows, prepared)]
            spec = {"name": model.name, "version": str(model.version)}
        names = [t.name for t in model.manifest.outputs]
        predictions = [
            r[0][0].tolist() if len(r) == 1 else {n: o[0].tolist() for n, o in zip(names, r)} for r in rows
        ]
        answer: dict[str, Any] = {"predictions": predictions, "model_spec": spec, "results": results,
                                  "batch_size": batch}
        if columnar:
            stacked = [np.concatenate([r[k] for r in rows]) for k in range(len(names))]
            answer["outputs"] = stacked[0].tolist() if len(names) == 1 else {
                n: o.tolist() for n, o in zip(names, stacked)
            }
        return answer

    @staticmethod
    def _infer(model: "LoadedModel", tensor: np.ndarray, what: str) -> list[np.ndarray]:
        """One runtime call, counted in the model's stats (per instance, as frames are)."""
        t0 = time.perf_counter()
        try:
            outputs = model.runtime.infer(tensor)
        except EdgeAgentError as exc:
            model.stats.error()
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{what}: inference failed: {exc}") from None
        n = tensor.shape[0] if tensor.ndim else 1
        per_instance = (time.perf_counter() - t0) * 1000.0 / max(1, n)
        for _ in range(n):
            model.stats.ok(per_instance)
        return outputs

    @contextmanager
    def _acquire(self, name: str, version: str | None, label: str | None) -> Iterator["LoadedModel"]:
        """The model version a path names, for one request; 503 while none is loaded."""
        wanted = self._version(name, version, label)
        try:
            with self.agent.models.acquire(name, version=wanted) as model:
                yield model
        except ModelNotAvailable as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None

    # health -------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every configured model has a loaded version and every
        configured source runs (started, not failed, not ended)."""
        problems = [f"model {name}: no version loaded"
                    for name, stats in self.agent.models.model_stats().items() if stats["version"] is None]
        workers = {w.source.name: w for w in self.agent.workers}
        for cfg in self.agent.config.sources:
            worker = workers.get(cfg.name)
            if worker is None:
                problems.append(f"source {cfg.name}: not started")
            elif worker.source.failed:
                problems.append(f"source {cfg.name}: could not be opened ({worker.source.last_error})")
            elif worker.done:
                problems.append(f"source {cfg.name}: ended")
        return not problems, problems


def _prepare(model: "LoadedModel", instance: Any, index: int) -> tuple[np.ndarray, Any]:
    """One instance as the model's batch-1 input and the transform back to
    the picture (identity for a preprocessed tensor: boxes stay in
    model-input pixels)."""
    if isinstance(instance, dict) and set(instance) == {"b64"}:
        return model.preprocess(_decode_image(instance["b64"], index))
    from edge_agent.preprocess import Transform

    return _tensor(instance, model, index), Transform()


def _batches(model: "LoadedModel") -> bool:
    """Instances of one request run as one batch where the model allows it:
    an ONNX model whose batch dimension is dynamic (LiteRT would have to
    resize its input tensors, and back, for every request)."""
    spec = model.manifest.inputs[0]
    return model.manifest.runtime == "onnx" and len(spec.shape) > 0 and spec.shape[0] is None


def _split(outputs: list[np.ndarray], n: int) -> list[list[np.ndarray]]:
    """Batched outputs back into one batch-1 list per instance."""
    for out in outputs:
        if out.shape[:1] != (n,):
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR,
                           f"the model answered a batch of {n} with an output of shape {list(out.shape)}")
    return [[out[i : i + 1] for out in outputs] for i in range(n)]


def _tensor_info(spec: Any) -> dict[str, Any]:
    return {
        "dtype": _TF_DTYPES.get(spec.dtype, "DT_INVALID"),
        "tensor_shape": {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape],
                         "unknown_rank": False},
        "name": spec.name,
    }


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None


def _instances(request: dict[str, Any], model: "LoadedModel", columnar: bool) -> list[Any]:
    """The request as a list of instances (row format), whatever its form."""
    input_name = model.runtime.inputs[0].name
    if not columnar:
        items = request["instances"]
        if not isinstance(items, list):
            raise ApiError(HTTPStatus.BAD_REQUEST, '"instances" must be a list')
        # Row format with named inputs: {"<input name>": value} per instance.
        return [it[input_name] if isinstance(it, dict) and set(it) == {input_name} else it for it in items]
    inputs = request["inputs"]
    if isinstance(inputs, dict) and "b64" not in inputs:
        if set(inputs) != {input_name}:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f'"inputs" names {sorted(inputs)}; the model has one input, {input_name!r}')
        inputs = inputs[input_name]
    if isinstance(inputs, dict):  # one b64 picture
        return [inputs]
    if not isinstance(inputs, list):
        raise ApiError(HTTPStatus.BAD_REQUEST, '"inputs" must be a list (batch first) or an object')
    return inputs


def _decode_image(data: Any, index: int) -> np.ndarray:
    import cv2

    if not isinstance(data, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, f'instance {index}: "b64" must be a base64 string')
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"instance {index}: not valid base64") from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if image is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"instance {index}: not a picture OpenCV can decode (JPEG or PNG)")
    return image


def _tensor(instance: Any, model: "LoadedModel", index: int) -> np.ndarray:
    """A preprocessed instance as the model's batch-1 input tensor."""
    spec = model.runtime.inputs[0]
    try:
        array = np.asarray(instance, dtype=np.float32)
    except (TypeError, ValueError):
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f'instance {index}: expected {{"b64": ...}} or a numeric tensor of shape {spec.shape[1:]}') from None
    want = spec.shape[1:]
    if array.ndim != len(want) or any(d is not None and d != s for d, s in zip(want, array.shape)):
        raise ApiError(HTTPStatus.BAD_REQUEST,
                       f"instance {index}: shape {list(array.shape)}, the model's input {spec.name!r} takes "
                       f"{['?' if d is None else d for d in want]} per instance")
    if not np.all(np.isfinite(array)):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"instance {index}: the tensor holds NaN or infinite values")
    return array[None]  # the runtime quantizes it where the model's input is int8


# -- metrics -------------------------------------------------------------------


class Metrics:
    """Prometheus metrics: request counters and latencies kept here, the rest
    read from the agent at scrape time (no per-frame work)."""

    def __init__(self, agent: "Agent") -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client import ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_AgentCollector(agent))
        self.requests = Counter("edge_agent_http_requests", "HTTP API requests by endpoint and status code.",
                                ["endpoint", "code"], registry=self.registry)
        self.predict_seconds = Histogram(
            "edge_agent_http_predict_seconds", "Predict request time (decode, preprocess, inference, postprocess).",
            ["model"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _AgentCollector:
    """Reads the agent's own counters when Prometheus scrapes."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def describe(self) -> list[Any]:
        return []  # metric names depend on the configuration; collected on each scrape

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        agent = self.agent
        info = InfoMetricFamily("edge_agent", "The agent's version and device id.")
        info.add_metric([], {"version": __version__, "device_id": agent.config.device_id})
        yield info

        frames = CounterMetricFamily("edge_agent_source_frames", "Frames inferred per source.", labels=["source"])
        errors = CounterMetricFamily("edge_agent_source_errors", "Frames that failed per source.", labels=["source"])
        captured = CounterMetricFamily("edge_agent_source_captured_frames", "Frames read from the source.",
                                       labels=["source"])
        skipped = CounterMetricFamily("edge_agent_source_skipped_frames",
                                      "Frames dropped because a newer one arrived first.", labels=["source"])
        up = GaugeMetricFamily("edge_agent_source_up", "1 while the source delivers frames.", labels=["source"])
        for w in agent.workers:
            name = w.source.name
            stats = w.source.stats()
            frames.add_metric([name], w.stats.frames)
            errors.add_metric([name], w.stats.errors)
            captured.add_metric([name], stats["captured"])
            skipped.add_metric([name], stats["skipped"])
            up.add_metric([name], 0.0 if (w.done or w.source.failed) else 1.0)
        yield from (frames, errors, captured, skipped, up)

        active = GaugeMetricFamily("edge_agent_model_active_version", "The version that serves (0: none).",
                                   labels=["model"])
        loaded = GaugeMetricFamily("edge_agent_model_loaded_versions", "Versions loaded in memory.", labels=["model"])
        inferences = CounterMetricFamily("edge_agent_model_inferences", "Inferences of the serving version.",
                                         labels=["model", "version"])
        failures = CounterMetricFamily("edge_agent_model_errors", "Failed inferences of the serving version.",
                                       labels=["model", "version"])
        p50 = GaugeMetricFamily("edge_agent_model_inference_ms_p50",
                                "Median inference time of the serving version over its last 200 runs.",
                                labels=["model", "version"])
        status = agent.models.status()
        for name, stats in agent.models.model_stats().items():
            active.add_metric([name], float(stats["version"] or 0))
            loaded.add_metric([name], float(len(status.get(name, {}).get("loaded", []))))
            if stats["version"] is None:
                continue
            v = str(stats["version"])
            inferences.add_metric([name, v], stats["frames"])
            failures.add_metric([name, v], stats["errors"])
            if stats["infer_ms_p50"] is not None:
                p50.add_metric([name, v], stats["infer_ms_p50"])
        yield from (active, loaded, inferences, failures, p50)

        if agent.transport is not None:
            connected = GaugeMetricFamily("edge_agent_mqtt_connected", "1 while connected to the broker.")
            connected.add_metric([], 1.0 if agent.transport.connected.is_set() else 0.0)
            yield connected


# -- HTTP plumbing ---------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = f"edge-agent/{__version__}"
    protocol_version = "HTTP/1.1"
    timeout: float  # an idle or stalled connection is closed (and its thread ends) after this many seconds
    api: Api  # set on the subclass made per server
    max_body: int
    _body_read = False

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle's
        # algorithm holds the body back until the client's delayed ACK of the
        # headers: 40 ms added to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("http %s: " + format, self.client_address[0], *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def _serve(self, method: str) -> None:
        self._body_read = False
        path = unquote(urlsplit(self.path).path)
        match = _MODEL_PATH.match(path)
        endpoint = path[1:] if path in _PLAIN_PATHS else _ENDPOINTS[match.group("what")] if match else "other"
        started = time.perf_counter()
        try:
            status, payload, content_type = self._route(method, path, match)
            if content_type is None:
                self._send_json(status, payload)
            else:
                self._send(status, payload, content_type)
            code = int(status)
        except ApiError as exc:
            code = int(exc.status)
            if not self._body_read and self.headers.get("Content-Length", "0") not in ("", "0"):
                self.close_connection = True  # an unread body must not be taken for the next request
            self._send_json(exc.status, {"error": exc.message})
        except Exception as exc:  # a bug must give a 500, not a dropped connection
            code = 500
            log.exception("http %s %s failed", method, path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        metrics = self.api.metrics
        metrics.requests.labels(endpoint, str(code)).inc()
        if endpoint == "predict":
            metrics.predict_seconds.labels(match.group("name")).observe(time.perf_counter() - started)

    def _route(self, method: str, path: str, match: re.Match[str] | None) -> tuple[HTTPStatus, Any, str | None]:
        """(status, payload, content type); a None content type sends the payload as JSON."""
        api = self.api
        if path in _PLAIN_PATHS:
            self._expect(method, "GET")
            if path == "/healthz":
                return HTTPStatus.OK, {"status": "alive"}, None
            if path == "/metrics":
                return (HTTPStatus.OK, *api.metrics.render())
            ready, problems = api.ready()
            return HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, {"ready": ready, "problems": problems}, None
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {path!r} (see docs/http.md)")
        name, version, label, what = match.group("name", "version", "label", "what")
        if what == ":predict":
            self._expect(method, "POST")
            return HTTPStatus.OK, api.predict(name, version, label, self._body()), None
        self._expect(method, "GET")
        if what == "/metadata":
            return HTTPStatus.OK, api.metadata(name, version, label), None
        return HTTPStatus.OK, api.model_status(name, version, label), None

    def _expect(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}")

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}") from None
        if n > self.max_body:
            self._discard(n)
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body is {n} bytes; at most {self.max_body} are accepted")
        self._body_read = True
        return self.rfile.read(n)

    def _discard(self, n: int) -> None:
        """Read a refused body (up to twice the limit) so that the client,
        still sending it, gets the 413 instead of a reset connection; a
        larger one is cut off. The connection is not reused either way."""
        self.close_connection = True
        left = n if n <= 2 * self.max_body else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _send_json(self, status: HTTPStatus | int, payload: Any) -> None:
        self._send(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json")

    def _send(self, status: HTTPStatus | int, body: bytes, content_type: str) -> None:
        self.send_response(int(status))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class HttpServer:
    """The API on ``host:port``; ``start`` binds (raising a clear error when
    the port is taken), ``stop`` shuts it down."""

    def __init__(self, agent: "Agent", host: str, port: int, *, max_body_bytes: int = 32 * 1024 * 1024,
                 idle_timeout_s: float = 30.0) -> None:
        self.api = Api(agent)
        self.host, self.port = host, port
        self.max_body = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self._server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self.api, "max_body": self.max_body,
                                                "timeout": self.idle_timeout_s})
        try:
            server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise EdgeAgentError(f"http: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}",
                                 code="http_bind_failed") from None
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="http",
                         daemon=True).start()  # ends when stop() shuts the server down
        log.info("HTTP API on http://%s:%d", *self.address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

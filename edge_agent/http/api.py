"""The local HTTP API: a TensorFlow Serving compatible subset (CONTRACT §5).

Served by the running agent on ``[http] host:port`` (default
127.0.0.1:8501) through :mod:`edge_agent.http.server`:

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

This module is the API as a pure request -> response layer:
:meth:`Api.handle` takes a :class:`Request` (method, target, headers, the
body as a reader) and gives a :class:`Response` (status, headers, body); the
wire is the server's. It reads nothing of the agent: the
agent hands it the model manager, a readiness callable and a stats callable
(:mod:`edge_agent.http.metrics`).

Thread-safety: ``handle`` is called from every connection's thread at once;
the API keeps no state of its own besides the metrics (thread-safe), and its
collaborators allow being called from any thread.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Protocol
from urllib.parse import unquote, urlsplit

import numpy as np

from edge_agent.errors import EdgeAgentError, ModelNotAvailable
from edge_agent.http.metrics import AgentStats, Metrics

if TYPE_CHECKING:
    from edge_agent.models.servable import LoadedModel

log = logging.getLogger(__name__)


class Models(Protocol):
    """What the API calls on the model manager (edge_agent.models.manager.ModelManager
    is one): status and stats to read, ``acquire`` for one request."""

    def status(self) -> dict[str, Any]: ...

    def model_stats(self) -> dict[str, dict[str, Any]]: ...

    def acquire(self, name: str, label: str | None = None,
                version: int | None = None) -> ContextManager["LoadedModel"]: ...


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


@dataclass(frozen=True)
class Request:
    """One request as the server read it."""

    method: str
    target: str
    """The request target as sent: the path, percent-escaped, and any query."""
    headers: Mapping[str, str]
    body: Callable[[], bytes]
    """Reads the body; called only by an endpoint that takes one (raises
    ApiError when the body cannot be read or is too large)."""


@dataclass(frozen=True)
class Response:
    """One answer; the server adds ``Content-Length`` (and ``Connection``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def json(cls, status: HTTPStatus | int, payload: Any) -> "Response":
        return cls(int(status), (("Content-Type", "application/json"),),
                   json.dumps(payload, separators=(",", ":")).encode())


class ApiError(Exception):
    """An answer other than 200: ``{"error": message}`` with ``status``."""

    def __init__(self, status: HTTPStatus | int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- the API -------------------------------------------------------------------


class Api:
    """What each endpoint answers.

    ``models``: the model manager the API serves through; ``ready``: the
    readiness check of ``/readyz`` (ready, and the problems when not);
    ``stats``: what ``/metrics`` reads of the agent at each scrape;
    ``max_instances``: instances one predict request may carry.
    """

    def __init__(self, models: Models, *, ready: Callable[[], tuple[bool, list[str]]],
                 stats: Callable[[], AgentStats], max_instances: int = MAX_INSTANCES) -> None:
        self.models = models
        self.ready = ready
        self.max_instances = max_instances
        self.metrics = Metrics(models, stats)
        self._models = set(models.model_stats())  # the configured models: the manager serves exactly these

    # requests -----------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """The answer to one request, counted in the metrics; never raises
        for a bad request or a bug (a 4xx, or a 500 logged)."""
        method = request.method
        path = unquote(urlsplit(request.target).path)
        match = _MODEL_PATH.match(path)
        endpoint = path[1:] if path in _PLAIN_PATHS else _ENDPOINTS[match.group("what")] if match else "other"
        started = time.perf_counter()
        try:
            response = self._route(method, path, match, request)
        except ApiError as exc:
            response = Response.json(exc.status, {"error": exc.message})
        except Exception as exc:  # a bug must give a 500, not a dropped connection
            log.exception("http %s %s failed", method, path)
            response = Response.json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                     {"error": f"internal error: {type(exc).__name__}: {exc}"})
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        if endpoint == "predict":
            self.metrics.observe_predict(match.group("name"), time.perf_counter() - started)
        return response

    def _route(self, method: str, path: str, match: re.Match[str] | None, request: Request) -> Response:
        if path in _PLAIN_PATHS:
            _expect(method, "GET")
            if path == "/healthz":
                return Response.json(HTTPStatus.OK, {"status": "alive"})
            if path == "/metrics":
                text, content_type = self.metrics.render()
                return Response(int(HTTPStatus.OK), (("Content-Type", content_type),), text)
            ready, problems = self.ready()
            return Response.json(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"ready": ready, "problems": problems})
        if match is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"no endpoint {path!r} (see docs/http.md)")
        name, version, label, what = match.group("name", "version", "label", "what")
        if what == ":predict":
            _expect(method, "POST")
            return Response.json(HTTPStatus.OK, self.predict(name, version, label, request.body()))
        _expect(method, "GET")
        if what == "/metadata":
            return Response.json(HTTPStatus.OK, self.metadata(name, version, label))
        return Response.json(HTTPStatus.OK, self.model_status(name, version, label))

    # model status -------------------------------------------------------

    def _status(self, name: str) -> dict[str, Any]:
        """The manager's status of one configured model (404 for another)."""
        if name not in self._models:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Servable not found for request: model {name!r} is not served here")
        return self.models.status()[name]

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
            with self.models.acquire(name, version=wanted) as model:
                yield model
        except ModelNotAvailable as exc:
            raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc)) from None


def _expect(method: str, allowed: str) -> None:
    if method != allowed:
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}")


def _prepare(model: "LoadedModel", instance: Any, index: int) -> tuple[np.ndarray, Any]:
    """One instance as the model's batch-1 input and the transform back to
    the picture (identity for a preprocessed tensor: boxes stay in
    model-input pixels)."""
    if isinstance(instance, dict) and set(instance) == {"b64"}:
        return model.preprocess(_decode_image(instance["b64"], index))
    from edge_agent.pipeline.preprocess import Transform

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

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
    TF Serving's predict (its ``api_rest.md``), for any model:
    ``{"instances": [...]}`` (row format: per instance a value, or an
    object by input name) answered ``{"predictions": [...]}``, or
    ``{"inputs": ...}`` (columnar: a value, or an object by input name)
    answered ``{"outputs": ...}``; several outputs as objects by name;
    ``signature_name`` ``serving_default`` (another is refused). JSON is
    typed by the signature (:mod:`.rest`). For a camera model (classify,
    detect) an image input's value may be ``{"b64": "<JPEG or PNG>"}``,
    decoded and preprocessed exactly as camera frames are, and its answer
    carries, as an extension, ``model_spec`` (the version that answered),
    ``batch_size`` and ``results``: per instance what a camera frame would
    have published (top classes with labels, or detections in the
    picture's pixels). A tensor model's answer is exactly TF Serving's.
``POST ...:classify`` / ``:regress``
    501: not supported (no TensorFlow classify/regress signatures here).
``GET /healthz``, ``GET /readyz``, ``GET /metrics``
    alive; ready (every model has a loaded version and every source runs);
    Prometheus text format.

Errors are ``{"error": "<message>"}`` with a 4xx/5xx status, as TF Serving
answers them: the serving core's status code mapped as TF Serving's HTTP
server maps it (:data:`HTTP_STATUS`). Inference goes through the serving
core (:class:`edge_agent.serving.Predictor`), which acquires the model per
request as frames do, so a hot swap never fails a request.

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

from edge_agent.http import rest
from edge_agent.http.metrics import AgentStats, Metrics
from edge_agent.http.rest import tensor_info_json
from edge_agent.serving import SIGNATURE_NAME, Predictor, ServingError, TensorInfo
from edge_agent.serving.predict import Session

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
    r"(?P<what>/metadata|:predict|:classify|:regress)?/?$"
)

_PLAIN_PATHS = ("/healthz", "/readyz", "/metrics")
_ENDPOINTS = {":predict": "predict", "/metadata": "metadata", None: "status",
              ":classify": "classify", ":regress": "regress"}  # the metrics' endpoint label

#: A serving status code -> the HTTP status TF Serving's HTTP server answers it with
#: (tensorflow_serving/model_servers/http_server.cc, ToHTTPStatusCode).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404, "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503, "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "DEADLINE_EXCEEDED": 504,
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
    ``max_instances``: instances one predict request may carry;
    ``predictor``: the serving core the API predicts through (shared with
    gRPC; by default one over ``models``); ``metrics``: the agent's metrics
    (shared with gRPC, kept across a restart of the API; by default its own).
    """

    def __init__(self, models: Models, *, ready: Callable[[], tuple[bool, list[str]]],
                 stats: Callable[[], AgentStats], max_instances: int = MAX_INSTANCES,
                 predictor: Predictor | None = None, metrics: Metrics | None = None) -> None:
        self.models = models
        self.predictor = predictor if predictor is not None else Predictor(models)
        self.ready = ready
        self.max_instances = max_instances
        self.metrics = metrics if metrics is not None else Metrics(models, stats)

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
        except ServingError as exc:
            response = Response.json(HTTP_STATUS.get(exc.code, 500), {"error": exc.message})
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
        if what in (":classify", ":regress"):
            _expect(method, "POST")
            verb = what[1:]
            raise ServingError("UNIMPLEMENTED", f"{verb.capitalize()} is not supported here: models are ONNX or "
                               f"TFLite, without TensorFlow's {verb} signatures; use :predict (docs/http.md)")
        _expect(method, "GET")
        if what == "/metadata":
            return Response.json(HTTPStatus.OK, self.metadata(name, version, label))
        return Response.json(HTTPStatus.OK, self.model_status(name, version, label))

    # model status -------------------------------------------------------

    def model_status(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        """TF Serving's GetModelStatus as JSON: the serving core's answer
        (the same versions, states and NOT_FOUND words as over gRPC)."""
        entries = [{"version": str(vs.version), "state": vs.state,
                    "status": {"error_code": vs.error_code, "error_message": vs.error_message}}
                   for vs in self.predictor.status(name, *self._pick(name, version, label))]
        return {"model_version_status": entries}

    def metadata(self, name: str, version: str | None, label: str | None) -> dict[str, Any]:
        with self.predictor.session(name, *self._pick(name, version, label)) as session:
            model, sig = session.model, session.signature
            m = model.manifest
            labels = model.postprocess.labels if model.postprocess is not None else None
            return {
                "model_spec": {"name": name, "signature_name": "", "version": str(model.version)},
                "metadata": {"signature_def": {"signature_def": {SIGNATURE_NAME: {
                    "inputs": {n: tensor_info_json(t) for n, t in sig.inputs.items()},
                    "outputs": {n: tensor_info_json(t) for n, t in sig.outputs.items()},
                    "method_name": sig.method_name,
                }}}},
                "edge_agent": {
                    "task": m.task,
                    "runtime": m.runtime,
                    "preprocessing": m.preprocessing.model_dump(mode="json") if m.preprocessing else None,
                    "postprocessing": m.postprocessing.model_dump(mode="json") if m.postprocessing else None,
                    "labels": len(labels) if labels else 0,
                    "created_by": m.created_by,
                },
            }

    # predict ------------------------------------------------------------

    @staticmethod
    def _pick(name: str, version: str | None, label: str | None) -> tuple[int | None, str | None]:
        """The version and label a path names, as the Predictor takes them."""
        if version is None:
            return None, label
        try:
            return int(version), None
        except ValueError:
            raise ServingError("INVALID_ARGUMENT", f"Failed to convert version: {version} to numeric "
                                                   "(a version is an integer)") from None

    def predict(self, name: str, version: str | None, label: str | None, body: bytes) -> dict[str, Any]:
        """TF Serving's predict: the row (``instances``) or columnar
        (``inputs``) format in, ``predictions`` or ``outputs`` out. A camera
        model's answer also carries, as an extension, ``model_spec``,
        ``batch_size`` and ``results`` (what a camera frame would have
        published); a tensor model's is exactly TF Serving's."""
        request = _parse_json(body)
        if not isinstance(request, dict):
            raise ServingError("INVALID_ARGUMENT", f"JSON Value: {str(request)[:40]} Is not object "
                               '(the body must be an object with "instances" or "inputs")')
        signature_name = request.get("signature_name")
        if signature_name is not None and not isinstance(signature_name, str):
            raise ServingError("INVALID_ARGUMENT", "'signature_name' key must be a string value.")
        with self.predictor.session(name, *self._pick(name, version, label)) as session:
            if signature_name not in (None, "", SIGNATURE_NAME):
                raise ServingError("INVALID_ARGUMENT",
                                   f'Serving signature name: "{signature_name}" not found in signature def')
            if "instances" in request and "inputs" in request:
                raise ServingError("INVALID_ARGUMENT", "Not formatted correctly expecting only one of 'inputs' "
                                   "or 'instances' keys to exist, not both")
            if "instances" not in request and "inputs" not in request:
                raise ServingError("INVALID_ARGUMENT", "Missing 'inputs' or 'instances' key: the body must be an "
                                   'object with "instances" (row format) or "inputs" (columnar)')
            columnar = "inputs" in request
            call = _Call(session, self.max_instances)
            if columnar:
                feeds = call.columnar(request["inputs"])
            else:
                feeds = call.rows(request["instances"])
            outputs = call.run(feeds)
            model = session.model
            if columnar:
                answer: dict[str, Any] = {"outputs": rest.columnar_answer(outputs)}
            else:
                answer = {"predictions": rest.row_answer(outputs)}
            if model.postprocess is not None:
                names = list(outputs)
                n = call.batch_size(outputs)
                results = [model.postprocess([outputs[k][i:i + 1] for k in names], call.transform(i))
                           for i in range(n)]
                answer.update(model_spec={"name": model.name, "version": str(model.version)},
                              results=results, batch_size=call.ran_batch)
        return answer


class _Call:
    """One predict request's inputs, made into tensors under one acquired
    version (a picture decoded and preprocessed by that version's own
    preprocessing), and run: as one batch, or one instance at a time where
    the model takes one (a static batch of 1, or a LiteRT camera model)."""

    def __init__(self, session: Session, max_instances: int) -> None:
        self.session = session
        self.model = session.model
        self.sig = session.signature
        self.max_instances = max_instances
        self.transforms: dict[int, Any] = {}
        self.ran_batch = 1
        first = next(iter(self.sig.inputs.values()))
        self._picture_input = first.name if self.model.preprocess is not None else None

    def transform(self, i: int) -> Any:
        from edge_agent.pipeline.preprocess import Transform

        return self.transforms.get(i) or Transform()

    # -- the two formats ----------------------------------------------------

    def rows(self, instances: Any) -> dict[str, np.ndarray]:
        if not isinstance(instances, list):
            raise ServingError("INVALID_ARGUMENT", "Excepting 'instances' to be an list/array: "
                               '"instances" must be a list')
        if not instances:
            raise ServingError("INVALID_ARGUMENT", "no instances to predict: 'instances' is an empty list")
        if len(instances) > self.max_instances:
            raise ServingError("INVALID_ARGUMENT",
                               f"{len(instances)} instances in one request; at most {self.max_instances}")
        names = list(self.sig.inputs)
        named = isinstance(instances[0], dict) and not rest.is_b64(instances[0])
        if not named and len(names) > 1:
            raise ServingError("INVALID_ARGUMENT", "instances is a plain list, but expecting list of objects as "
                               f"multiple input tensors required as per tensorinfo_map: {','.join(names)}")
        columns: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for i, item in enumerate(instances):
            if named:
                if not isinstance(item, dict) or rest.is_b64(item):
                    raise ServingError("INVALID_ARGUMENT", f"Expecting object but got list at item {i} of input list")
                if set(item) != set(names):
                    raise ServingError("INVALID_ARGUMENT",
                                       f"Failed to process element: {i} of 'instances' list. JSON object: "
                                       f"{_short(item)} must only have keys: {','.join(sorted(names))}")
                values = item
            else:
                if isinstance(item, dict) and not rest.is_b64(item):
                    raise ServingError("INVALID_ARGUMENT",
                                       f"Expecting value/list but got object at item {i} of input list")
                values = {names[0]: item}
            for n in names:
                columns[n].append(self._instance(values[n], self.sig.inputs[n], i))
        return {n: self._stack(n, arrays) for n, arrays in columns.items()}

    def columnar(self, inputs: Any) -> dict[str, np.ndarray]:
        names = list(self.sig.inputs)
        if not isinstance(inputs, dict) or rest.is_b64(inputs):
            if len(names) > 1:
                raise ServingError("INVALID_ARGUMENT", "inputs is a plain value/list, but expecting an object as "
                                   f"multiple input tensors required as per tensorinfo_map: {','.join(names)}")
            inputs = {names[0]: inputs}
        missing = [n for n in names if n not in inputs]
        if missing:
            extra = sorted(set(inputs) - set(names))
            have = f"the model has one input, {names[0]!r}" if len(names) == 1 else \
                f"the model's inputs are {', '.join(map(repr, names))}"
            raise ServingError("INVALID_ARGUMENT", f"Missing named input: {missing[0]} in 'inputs' object "
                               f"({have}; sent {', '.join(map(repr, extra)) or 'nothing else'})")
        feeds = {}
        for n in names:
            value = inputs[n]
            if n == self._picture_input and (rest.is_b64(value) or
                                             (isinstance(value, list) and value and rest.is_b64(value[0]))):
                # pictures: one, or a list of them (mixed with tensors), each an instance
                feeds[n] = self.rows(value if isinstance(value, list) else [value])[n]
            else:
                feeds[n] = rest.to_array(value, self.sig.inputs[n])
                if n == self._picture_input and feeds[n].ndim and feeds[n].shape[0] > self.max_instances:
                    raise ServingError("INVALID_ARGUMENT", f"{feeds[n].shape[0]} instances in one request; "
                                       f"at most {self.max_instances}")
        return feeds

    def _instance(self, value: Any, info: TensorInfo, i: int) -> np.ndarray:
        """One instance's value of one input, without the batch dimension."""
        if info.name == self._picture_input and rest.is_b64(value):
            tensor, transform = self.model.preprocess(_decode_image(value, i))
            self.transforms[i] = transform
            return tensor[0]
        try:
            array = rest.to_array(value, info)
        except ServingError as exc:
            hint = ""
            if info.name == self._picture_input:
                hint = f' (expected {{"b64": ...}} or a numeric tensor of shape {info.shape[1:]})'
            raise ServingError(exc.code, f"Failed to process element: {i} of 'instances' list. "
                               f"Error: {exc.message}{hint}") from None
        want = TensorInfo(info.name, info.dtype, info.shape[1:])
        if not want.accepts(array.shape):
            raise ServingError("INVALID_ARGUMENT",
                               f"instance {i}: shape {list(array.shape)}, the model's input {info.name!r} takes "
                               f"{want.shape} per instance (-1: any size)")
        if info.name == self._picture_input and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise ServingError("INVALID_ARGUMENT", f"instance {i}: the tensor holds NaN or infinite values")
        return array

    @staticmethod
    def _stack(name: str, arrays: list[np.ndarray]) -> np.ndarray:
        first = arrays[0].shape
        for i, a in enumerate(arrays[1:], 1):
            if a.shape != first:
                raise ServingError("INVALID_ARGUMENT", f"Failed to process element: {i} key: {name} of "
                                   f"'instances' list. Error: Expecting shape {list(first)} but got: {list(a.shape)}")
        return np.stack(arrays)

    # -- running ---------------------------------------------------------------

    def _one_at_a_time(self, feeds: dict[str, np.ndarray]) -> bool:
        first = next(iter(self.sig.inputs.values()))
        n = feeds[first.name].shape[0] if feeds[first.name].ndim else 1
        if n <= 1:
            return False
        static_one = bool(first.shape) and first.shape[0] == 1
        # LiteRT would resize its tensors for the request and back for the next frame
        camera_tflite = self.model.preprocess is not None and self.model.manifest.runtime == "tflite"
        return static_one or camera_tflite

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self.session.validate(feeds) if not self._one_at_a_time(feeds) else feeds
        if not self._one_at_a_time(feeds):
            first = next(iter(feeds.values()))
            self.ran_batch = int(first.shape[0]) if first.ndim else 1
            return self.session.run(feeds)
        n = next(iter(feeds.values())).shape[0]
        parts = [self.session.run(self.session.validate({k: v[i:i + 1] for k, v in feeds.items()}))
                 for i in range(n)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @staticmethod
    def batch_size(outputs: dict[str, np.ndarray]) -> int:
        first = next(iter(outputs.values()))
        return int(first.shape[0]) if first.ndim else 1


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _expect(method: str, allowed: str) -> None:
    if method != allowed:
        raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed here; use {allowed}")


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"JSON Parse error: the body is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[... nested past Python's stack: the client's fault, not a 500 and a traceback
        raise ApiError(HTTPStatus.BAD_REQUEST, "JSON Parse error: the body nests arrays or objects too deeply "
                       "(a tensor has at most 64 dimensions)") from None


def _decode_image(value: dict[str, str], index: int) -> np.ndarray:
    """A ``{"b64": ...}`` instance of a camera model: the JPEG or PNG it holds."""
    import cv2

    try:
        raw = rest.decode_b64(value)
    except ServingError:
        raise ServingError("INVALID_ARGUMENT", f"instance {index}: Unable to base64 decode (not valid base64)") from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if image is None:
        raise ServingError("INVALID_ARGUMENT",
                           f"instance {index}: not a picture OpenCV can decode (JPEG or PNG)")
    return image

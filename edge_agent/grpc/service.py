"""TF Serving's gRPC services over the serving core.

``tensorflow.serving.PredictionService`` (``Predict``, ``GetModelMetadata``)
and ``tensorflow.serving.ModelService`` (``GetModelStatus``), answered through
:class:`edge_agent.serving.predict.Predictor`: the same resolution, input
checks and inference as the REST API. What a servicer adds is the wire:
``ModelSpec`` (name, ``version`` or ``version_label``, ``signature_name``)
in, ``TensorProto`` <-> numpy (:mod:`edge_agent.grpc.tensors`), and each
:class:`~edge_agent.serving.errors.ServingError` answered with the gRPC
status code of the same name and its message. Classify, Regress,
MultiInference and HandleReloadConfigRequest are not in the services, so
gRPC itself answers them UNIMPLEMENTED.

Thread-safety: the servicers hold no state of their own; gRPC calls them
from its worker threads at once, and the Predictor acquires a model per
request.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import grpc

from edge_agent.grpc import tensors
from edge_agent.grpc.protos import (
    error_codes_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    meta_graph_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from edge_agent.serving.errors import ServingError
from edge_agent.serving.signature import SIGNATURE_NAME

log = logging.getLogger(__name__)

#: The one metadata field TF Serving (and this agent) answers.
SIGNATURE_DEF = "signature_def"


def _version_choice(spec: Any) -> tuple[int | None, str | None]:
    """(version, label) of a ModelSpec; at most one is set (a oneof)."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return int(spec.version.value), None
    if which == "version_label":
        return None, spec.version_label or None
    return None, None


def _model_name(spec: Any) -> str:
    if not spec.name:
        raise ServingError("INVALID_ARGUMENT", "Missing ModelSpec name: model_spec.name is empty")
    return spec.name


def _abort(context: grpc.ServicerContext, exc: ServingError) -> None:
    code = getattr(grpc.StatusCode, str(exc.code), grpc.StatusCode.UNKNOWN)
    context.abort(code, exc.message)


#: ``observe(method, model name as the client spelt it, status code name, seconds)``,
#: called once per answered call (:meth:`edge_agent.http.metrics.Metrics.observe_grpc`).
Observe = Callable[[str, "str | None", str, float], None]


class _Answering:
    """Runs a call, turning the serving core's errors into gRPC statuses,
    and counts it (``observe``) as the HTTP API counts its requests."""

    observe: Observe | None = None

    def _answer(self, method: str, context: grpc.ServicerContext, call: Any, request: Any) -> Any:
        started, code = time.perf_counter(), "OK"
        try:
            return call(request)
        except ServingError as exc:
            log.debug("grpc %s: %s %s", method, exc.code, exc.message)
            code = exc.code if hasattr(grpc.StatusCode, str(exc.code)) else "UNKNOWN"
            _abort(context, exc)
        except tensors.TensorError as exc:
            code = "INVALID_ARGUMENT"
            _abort(context, ServingError(code, str(exc)))
        except Exception as exc:  # a bug or a runtime failure: said, not hidden
            log.exception("grpc %s failed", method)
            code = "INTERNAL"
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if self.observe is not None:
                self.observe(method, getattr(getattr(request, "model_spec", None), "name", None), code,
                             time.perf_counter() - started)
        return None  # not reached: abort raises


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer, _Answering):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, predictor: Any, observe: Observe | None = None, max_tensor_bytes: int | None = None) -> None:
        self.predictor = predictor
        self.observe = observe
        self.max_tensor_bytes = max_tensor_bytes  # the largest array one input tensor may expand to

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's naming
        return self._answer("Predict", context, self._predict, request)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("GetModelMetadata", context, self._metadata, request)

    def _predict(self, request: Any) -> Any:
        spec = request.model_spec
        name = _model_name(spec)
        version, label = _version_choice(spec)
        if not request.inputs:
            raise ServingError("INVALID_ARGUMENT", "Missing inputs: the request has no input tensors")
        inputs = {}
        for key, proto in request.inputs.items():
            try:
                inputs[key] = tensors.to_numpy(proto, self.max_tensor_bytes)  # DT_STRING: bytes, decoded (or refused) by the serving core
            except tensors.TensorError as exc:
                raise ServingError("INVALID_ARGUMENT", f"input '{key}': {exc}") from None
        result = self.predictor.predict(
            name, inputs, version=version, label=label, signature_name=spec.signature_name or None,
            output_filter=list(request.output_filter) or None,
        )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = result.model
        response.model_spec.version.value = int(result.version)
        response.model_spec.signature_name = spec.signature_name or SIGNATURE_NAME
        for key, array in result.outputs.items():
            try:
                tensors.from_numpy(array, response.outputs[key])
            except tensors.TensorError as exc:
                raise ServingError("INTERNAL", f"output '{key}': {exc}") from None
        return response

    def _metadata(self, request: Any) -> Any:
        spec = request.model_spec
        name = _model_name(spec)
        fields = list(request.metadata_field)
        if not fields:
            raise ServingError("INVALID_ARGUMENT",
                               "GetModelMetadataRequest must specify at least one metadata_field "
                               f"(the one supported: {SIGNATURE_DEF!r})")
        unsupported = [f for f in fields if f != SIGNATURE_DEF]
        if unsupported:
            raise ServingError("INVALID_ARGUMENT", f"Metadata field {unsupported[0]} is not supported "
                               f"(the one supported: {SIGNATURE_DEF!r})")
        version, label = _version_choice(spec)
        resolved, signature = self.predictor.resolve(name, version=version, label=label)
        sig = meta_graph_pb2.SignatureDef(method_name=signature.method_name)
        for side, infos in (("inputs", signature.inputs), ("outputs", signature.outputs)):
            target = getattr(sig, side)
            for key, info in infos.items():
                target[key].CopyFrom(meta_graph_pb2.TensorInfo(
                    name=info.name, dtype=tensors.DTYPE_OF_NAME[info.dtype],
                    tensor_shape=tensors.shape_proto(info.shape),
                ))
        sigmap = get_model_metadata_pb2.SignatureDefMap()
        sigmap.signature_def[SIGNATURE_NAME].CopyFrom(sig)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = name
        response.model_spec.version.value = int(resolved)
        response.metadata[SIGNATURE_DEF].Pack(sigmap)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer, _Answering):
    """``tensorflow.serving.ModelService``: GetModelStatus."""

    def __init__(self, predictor: Any, observe: Observe | None = None) -> None:
        self.predictor = predictor
        self.observe = observe

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("GetModelStatus", context, self._status, request)

    def _status(self, request: Any) -> Any:
        spec = request.model_spec
        name = _model_name(spec)
        version, label = _version_choice(spec)
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for vs in self.predictor.status(name, version=version, label=label):
            entry = response.model_version_status.add()
            entry.version = int(vs.version)
            entry.state = states.Value(vs.state) if vs.state in states.keys() else states.UNKNOWN
            code = str(vs.error_code or "OK")
            entry.status.error_code = (error_codes_pb2.Code.Value(code) if code in error_codes_pb2.Code.keys()
                                       else error_codes_pb2.UNKNOWN)
            entry.status.error_message = vs.error_message or ""
        return response


def add_services(server: grpc.Server, predictor: Any, observe: Observe | None = None,
                 max_tensor_bytes: int | None = None) -> None:
    """Register both services on ``server``; ``observe`` (optional) counts every call;
    ``max_tensor_bytes`` bounds the array one request tensor may expand to."""
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(predictor, observe, max_tensor_bytes), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(predictor, observe), server)

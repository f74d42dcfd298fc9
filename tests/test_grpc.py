"""TF Serving's gRPC API (edge_agent.grpc): the real grpcio server and client
through the generated stubs, over the serving core and real ONNX Runtime
sessions of tiny models built in code."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="the grpc extra (grpcio) is not installed")

from edge_agent.errors import EdgeAgentError, ModelNotAvailable  # noqa: E402
from edge_agent.grpc import tensors  # noqa: E402
from edge_agent.grpc.protos import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    tensor_pb2,
    types_pb2,
)
from edge_agent.grpc.server import GrpcServer  # noqa: E402
from edge_agent.models.servable import ModelStats  # noqa: E402
from edge_agent.runtimes import create_runtime, describe_model  # noqa: E402
from edge_agent.serving import Predictor  # noqa: E402

DT = types_pb2.DataType


def _save(graph: Any, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def linear(path: Path) -> Path:
    """The ONNX tutorial's nn.Linear(4, 1), built by hand: output = input @ W.T + b, input [N, 4]."""
    from onnx import TensorProto, helper

    w = [0.5, -1.0, 2.0, 0.25]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "b"], ["output"], transB=1)],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [1, 4], w),
                     helper.make_tensor("b", TensorProto.FLOAT, [1], [0.125])],
    )
    return _save(graph, path)


def two_inputs(path: Path) -> Path:
    """a [N, 3] float and b [N, 3] int64 in; sum = a + b (float), idx = argmax(b) (int64) out."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT), helper.make_node("Add", ["a", "bf"], ["sum"]),
         helper.make_node("ArgMax", ["b"], ["idx"], axis=1, keepdims=0)],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"])],
    )
    return _save(graph, path)


def echo_strings(path: Path) -> Path:
    """A string tensor in, the same strings out (DT_STRING both ways)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
    )
    return _save(graph, path)


class Manager:
    """The model manager's reads and ``acquire`` over real runtimes: version 1
    of each model loaded and labelled ``stable``, version 2 installed only (labelled ``next``)."""

    def __init__(self, **models: Any) -> None:
        self.models = models

    def status(self) -> dict[str, Any]:
        return {n: {"versions": [1, 2], "labels": {"stable": 1, "next": 2}, "loaded": [1], "failed": {}}
                for n in self.models}

    def model_stats(self) -> dict[str, dict[str, Any]]:
        return {n: {"version": 1} for n in self.models}

    @contextmanager
    def acquire(self, name: str, label: str | None = None, version: int | None = None) -> Iterator[Any]:
        if version not in (None, 1):
            raise ModelNotAvailable(f"model {name}: version {version} is not loaded")
        yield self.models[name]


def loaded(path: Path, name: str) -> Any:
    inputs, outputs = describe_model(path, "onnx")
    runtime = create_runtime("onnx", path, inputs, outputs, threads=1)
    runtime.load()
    return SimpleNamespace(name=name, version=1, manifest=SimpleNamespace(inputs=inputs, outputs=outputs),
                           runtime=runtime, stats=ModelStats())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("grpc-models")
    return {"linear": linear(tmp / "linear.onnx"), "two": two_inputs(tmp / "two.onnx"),
            "echo": echo_strings(tmp / "echo.onnx")}


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[GrpcServer]:
    predictor = Predictor(Manager(**{name: loaded(path, name) for name, path in models.items()}))
    srv = GrpcServer(predictor, "127.0.0.1", 0, max_message_bytes=1_000_000, workers=4)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server: GrpcServer) -> Iterator[Any]:
    host, port = server.address
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: Any) -> Any:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def request(name: str, version: int | None = None, label: str | None = None, signature: str = "",
            **inputs: Any) -> Any:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    req.model_spec.signature_name = signature
    for key, value in inputs.items():
        req.inputs[key].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto) else tensors.from_numpy(value))
    return req


def ort(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_predict_equals_onnxruntime_run_directly(stub: Any, models: dict[str, Path]) -> None:
    """The tutorial's nn.Linear(4, 1) over gRPC answers what onnxruntime answers for the same batch, with
    the version and signature that answered in the response's model_spec."""
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    response = stub.Predict(request("linear", input=x), timeout=10)
    out = tensors.to_numpy(response.outputs["output"])
    np.testing.assert_array_equal(out, ort(models["linear"], {"input": x})[0])
    assert out.shape == (5, 1) and response.outputs["output"].dtype == DT.DT_FLOAT
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == ("linear", 1, "serving_default")


def test_typed_val_fields_and_several_named_inputs(stub: Any, models: dict[str, Path]) -> None:
    """Hand-written clients fill float_val / int64_val instead of tensor_content; every output comes back in
    the model's own dtype, and output_filter keeps only those asked for."""
    a = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT, float_val=[1, 2, 3, 4, 5, 6])
    a.tensor_shape.dim.add(size=2)
    a.tensor_shape.dim.add(size=3)
    b = tensor_pb2.TensorProto(dtype=DT.DT_INT64, int64_val=[0, 5, 1, 7, 0, 0])
    b.tensor_shape.dim.add(size=2)
    b.tensor_shape.dim.add(size=3)
    response = stub.Predict(request("two", a=a, b=b), timeout=10)
    want = ort(models["two"], {"a": np.arange(1, 7, dtype=np.float32).reshape(2, 3),
                               "b": np.array([[0, 5, 1], [7, 0, 0]], np.int64)})
    np.testing.assert_array_equal(tensors.to_numpy(response.outputs["sum"]), want[0])
    assert response.outputs["idx"].dtype == DT.DT_INT64
    np.testing.assert_array_equal(tensors.to_numpy(response.outputs["idx"]), want[1])
    req = request("two", a=a, b=b)
    req.output_filter.append("idx")
    assert list(stub.Predict(req, timeout=10).outputs) == ["idx"]


def test_strings_travel_as_string_val(stub: Any) -> None:
    """DT_STRING tensors are bytes both ways (string_val), as TF Serving sends them; the model's string
    tensors are text, so bytes that are not UTF-8 are refused by name rather than mangled."""
    text = tensor_pb2.TensorProto(dtype=DT.DT_STRING, string_val=[b"caf\xc3\xa9", b"x"])
    text.tensor_shape.dim.add(size=2)
    response = stub.Predict(request("echo", text=text), timeout=10)
    assert response.outputs["same"].dtype == DT.DT_STRING
    assert list(response.outputs["same"].string_val) == [b"caf\xc3\xa9", b"x"]
    text.string_val[1] = b"\xff\xfe"
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request("echo", text=text), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'text': string value 1 is not UTF-8 text" in err.value.details()


def test_get_model_metadata_packs_a_signature_def_map_in_any(stub: Any) -> None:
    """GetModelMetadata answers as TF Serving does: metadata["signature_def"] is a SignatureDefMap packed in
    google.protobuf.Any, with serving_default's inputs and outputs, dtypes and -1 for dynamic dimensions."""
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = "two"
    response = stub.GetModelMetadata(req, timeout=10)
    assert response.model_spec.name == "two" and response.model_spec.version.value == 1
    packed = response.metadata["signature_def"]
    assert packed.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sigmap = get_model_metadata_pb2.SignatureDefMap()
    assert packed.Unpack(sigmap)
    sig = sigmap.signature_def["serving_default"]
    assert sig.method_name == "tensorflow/serving/predict"
    assert {k: (v.name, v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in sig.inputs.items()} == {
        "a": ("a", DT.DT_FLOAT, [-1, 3]), "b": ("b", DT.DT_INT64, [-1, 3])}
    assert {k: (v.dtype, [d.size for d in v.tensor_shape.dim]) for k, v in sig.outputs.items()} == {
        "sum": (DT.DT_FLOAT, [-1, 3]), "idx": (DT.DT_INT64, [-1])}


def test_get_model_status_lists_versions_and_states(channel: Any) -> None:
    """ModelService.GetModelStatus: every installed version with TF Serving's state, newest first; one
    version when the request names it, the labelled one for a label."""
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "linear"
    states = get_model_status_pb2.ModelVersionStatus.State
    response = stub.GetModelStatus(req, timeout=10)
    assert [(s.version, s.state, s.status.error_code) for s in response.model_version_status] == [
        (2, states.END, 0), (1, states.AVAILABLE, 0)]
    req.model_spec.version.value = 1
    assert [s.version for s in stub.GetModelStatus(req, timeout=10).model_version_status] == [1]
    req.model_spec.version_label = "stable"
    assert [s.version for s in stub.GetModelStatus(req, timeout=10).model_version_status] == [1]
    # a label on a version that is installed but not loaded is reported (END), not NOT_FOUND: status reads
    # the store, it does not acquire a model
    req.model_spec.version_label = "next"
    assert [(s.version, s.state) for s in stub.GetModelStatus(req, timeout=10).model_version_status] == [
        (2, states.END)]
    req.model_spec.name = "junk"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelStatus(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _content(dtype: int, shape: list[int], data: bytes) -> Any:
    t = tensor_pb2.TensorProto(dtype=dtype, tensor_content=data)
    for d in shape:
        t.tensor_shape.dim.add(size=d)
    return t


X = np.ones((1, 4), np.float32)


@pytest.mark.parametrize("req, code, words", [
    (lambda: request("junk", input=X), "NOT_FOUND", "Servable not found for request: Latest(junk)"),
    (lambda: request("linear", version=7, input=X), "NOT_FOUND", "Specific(linear, 7)"),
    (lambda: request("linear", label="canary", input=X), "NOT_FOUND", "Unrecognized servable version label: canary"),
    (lambda: request("", input=X), "INVALID_ARGUMENT", "model_spec.name is empty"),
    (lambda: request("linear"), "INVALID_ARGUMENT", "no input tensors"),
    (lambda: request("linear", x=X), "INVALID_ARGUMENT", "Sent extra: {x}. Missing but required: {input}."),
    (lambda: request("linear", input=np.ones((1, 3), np.float32)), "INVALID_ARGUMENT",
     "input 'input': shape [1, 3] does not match the signature's [-1, 4]"),
    (lambda: request("two", a=np.ones((1, 3), np.float32), b=np.full((1, 3), 0.5)), "INVALID_ARGUMENT",
     "input 'b': expects int64 but float64 is provided"),
    (lambda: request("linear", input=_content(DT.DT_FLOAT, [1, 4], b"\0" * 12)), "INVALID_ARGUMENT",
     "input 'input': tensor_content has 12 bytes; shape [1, 4] of DT_FLOAT needs 16"),
    (lambda: request("linear", input=_content(DT.DT_BFLOAT16, [1, 4], b"\0" * 8)), "INVALID_ARGUMENT",
     "input 'input': dtype DT_BFLOAT16 is not supported"),
    (lambda: request("linear", signature="nope", input=X), "FAILED_PRECONDITION",
     'Serving signature key "nope" not found.'),
])
def test_bad_requests_get_tf_servings_status_code_and_say_what_is_wrong(stub: Any, req: Any, code: str,
                                                                        words: str) -> None:
    """Every refusal is the gRPC status TF Serving gives it, with a message naming the fault; the server
    keeps serving."""
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(req(), timeout=10)
    assert err.value.code() == getattr(grpc.StatusCode, code), err.value.details()
    assert words in err.value.details()
    assert stub.Predict(request("linear", input=X), timeout=10).outputs["output"].tensor_content


def test_metadata_needs_the_signature_def_field(stub: Any) -> None:
    """GetModelMetadata without metadata_field, or with one TF Serving does not know, is INVALID_ARGUMENT."""
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "linear"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "metadata_field" in err.value.details()
    req.metadata_field.append("nope")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelMetadata(req, timeout=10)
    assert "Metadata field nope is not supported" in err.value.details()


def test_a_request_over_the_size_limit_is_refused_and_serving_goes_on(stub: Any) -> None:
    """[grpc] max_message_mb bounds what one request may make the device hold: a larger one is
    RESOURCE_EXHAUSTED before it reaches a model."""
    big = np.zeros((70_000, 4), np.float32)  # 1.1 MB > the fixture's 1 MB
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request("linear", input=big), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Predict(request("linear", input=X), timeout=10).model_spec.version.value == 1


def test_a_few_bytes_of_shape_cannot_make_the_device_hold_gigabytes(stub: Any) -> None:
    """TensorFlow's rule repeats a typed field's last value to fill the shape, so a 20-byte request with
    tensor_shape [2e9] would make the agent allocate 8 GB (it did: 15 GB RSS on a live agent). The array a
    request tensor expands to is held to the message limit: INVALID_ARGUMENT naming the shape."""
    t = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT, float_val=[1.0])
    t.tensor_shape.dim.add(size=100_000)  # 1.6 MB as an array > the fixture's 1 MB, in a message of a few bytes
    t.tensor_shape.dim.add(size=4)
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request("linear", input=t), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor_shape [100000, 4] of DT_FLOAT is 1600000 bytes" in err.value.details()
    assert stub.Predict(request("linear", input=X), timeout=10).model_spec.version.value == 1


def test_a_shape_too_large_to_count_is_refused_not_overflowed() -> None:
    """Dimensions whose product overflows int64 must not wrap to a small count (a crash or a wrong
    tensor): the size is counted exactly and refused."""
    t = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT)
    t.tensor_shape.dim.add(size=2**32)
    t.tensor_shape.dim.add(size=2**32)
    with pytest.raises(tensors.TensorError, match="at most 1000"):
        tensors.to_numpy(t, max_bytes=1000)


def test_classify_and_regress_are_unimplemented(channel: Any) -> None:
    """TF Serving's Classify/Regress (tf.Example inputs) are not served: gRPC's own UNIMPLEMENTED, not a hang."""
    call = channel.unary_unary("/tensorflow.serving.PredictionService/Classify",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        call(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_taken_port_is_a_clear_error(server: GrpcServer) -> None:
    """A second server on the same port fails at start, naming the address (no silent port sharing)."""
    host, port = server.address
    other = GrpcServer(server.predictor, host, port, max_message_bytes=1000)
    with pytest.raises(EdgeAgentError, match=f"grpc: cannot serve on 127.0.0.1:{port}"):
        other.start()


# -- TensorProto <-> numpy -----------------------------------------------------


def test_typed_fields_repeat_the_last_value_as_tensorflow_does() -> None:
    """make_ndarray's rule: fewer values than the shape holds repeat the last one; none is all zeros;
    more is an error."""
    t = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT, float_val=[1.5])
    t.tensor_shape.dim.add(size=2)
    t.tensor_shape.dim.add(size=2)
    np.testing.assert_array_equal(tensors.to_numpy(t), np.full((2, 2), 1.5, np.float32))
    del t.float_val[:]
    np.testing.assert_array_equal(tensors.to_numpy(t), np.zeros((2, 2), np.float32))
    t.float_val.extend([1, 2, 3, 4, 5])
    with pytest.raises(tensors.TensorError, match="float_val has 5 values; shape \\[2, 2\\] holds 4"):
        tensors.to_numpy(t)


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2], np.float16), np.array([[1, -2]], np.int8),
    np.array([255, 0], np.uint8), np.array([2**40], np.int64), np.array([True, False]), np.array(3.5),
    np.array([1e300], np.float64), np.array([1 + 2j], np.complex64),
])
def test_numpy_round_trips(array: np.ndarray) -> None:
    """What the agent answers is what the client decodes, dtype and shape included."""
    back = tensors.to_numpy(tensors.from_numpy(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_narrow_ints_and_halves_from_their_typed_fields() -> None:
    """int8/uint8/int16 travel in int_val and DT_HALF as bit patterns in half_val; a value outside the dtype's
    range is an error, never a silent wrap."""
    t = tensor_pb2.TensorProto(dtype=DT.DT_UINT8, int_val=[0, 255])
    t.tensor_shape.dim.add(size=2)
    assert tensors.to_numpy(t).tolist() == [0, 255]
    t.int_val.append(256)
    t.tensor_shape.dim[0].size = 3
    with pytest.raises(tensors.TensorError, match="outside DT_UINT8's range"):
        tensors.to_numpy(t)
    h = tensor_pb2.TensorProto(dtype=DT.DT_HALF, half_val=np.array([1.5, -2], np.float16).view(np.uint16).tolist())
    h.tensor_shape.dim.add(size=2)
    assert tensors.to_numpy(h).tolist() == [1.5, -2.0]


def test_a_shape_must_be_known() -> None:
    """A request tensor with a -1 dimension or unknown rank cannot be laid out: said, not guessed."""
    t = tensor_pb2.TensorProto(dtype=DT.DT_FLOAT, float_val=[1.0])
    t.tensor_shape.dim.add(size=-1)
    with pytest.raises(tensors.TensorError, match="negative dimension"):
        tensors.to_numpy(t)


# -- [grpc] config -------------------------------------------------------------


def test_grpc_config_defaults_and_mistakes(tmp_path: Path) -> None:
    """[grpc] is off by default on TF Serving's port 8500 bound to loopback; a typo, a quoted port or TLS
    without its key is a config error naming the key."""
    from edge_agent.config import parse_config
    from edge_agent.errors import ConfigError

    cfg = parse_config({}).grpc
    assert (cfg.enabled, cfg.host, cfg.port, cfg.max_message_mb, cfg.tls) == (False, "127.0.0.1", 8500, 32.0, None)
    cfg = parse_config({"grpc": {"enabled": True, "tls": {"certfile": "c.pem", "keyfile": "k.pem"}}},
                       base_dir=tmp_path).grpc
    assert cfg.tls.certfile == tmp_path / "c.pem" and cfg.tls.client_ca_certs is None
    for bad, words in [({"enabeld": True}, "grpc.enabeld: unknown key"), ({"port": "8500"}, "grpc.port"),
                       ({"tls": {"certfile": "c.pem"}}, "grpc.tls.keyfile: required key is missing"),
                       ({"max_message_mb": 0}, "grpc.max_message_mb")]:
        with pytest.raises(ConfigError) as err:
            parse_config({"grpc": bad}, source="agent.toml")
        assert f"agent.toml: {words}" in str(err.value), err.value


def test_tls_with_a_client_certificate(models: dict[str, Path], tmp_path: Path) -> None:
    """[grpc.tls]: the port speaks TLS with the configured certificate; with client_ca_certs a client
    without a certificate of that CA is refused, one with it is served."""
    pytest.importorskip("cryptography")
    from edge_agent.config import ServerTlsConfig

    ca_key, ca_cert = _cert(tmp_path, "ca", None)
    _cert(tmp_path, "server", (ca_key, ca_cert), dns="localhost")
    _cert(tmp_path, "client", (ca_key, ca_cert))
    tls = ServerTlsConfig(certfile=tmp_path / "server.pem", keyfile=tmp_path / "server.key",
                          client_ca_certs=tmp_path / "ca.pem")
    predictor = Predictor(Manager(linear=loaded(models["linear"], "linear")))
    srv = GrpcServer(predictor, "127.0.0.1", 0, max_message_bytes=1_000_000, tls=tls)
    srv.start()
    try:
        target = f"localhost:{srv.address[1]}"
        root = (tmp_path / "ca.pem").read_bytes()
        no_cert = grpc.ssl_channel_credentials(root_certificates=root)
        with grpc.secure_channel(target, no_cert) as ch, pytest.raises(grpc.RpcError) as err:
            prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request("linear", input=X), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(root_certificates=root,
                                             private_key=(tmp_path / "client.key").read_bytes(),
                                             certificate_chain=(tmp_path / "client.pem").read_bytes())
        with grpc.secure_channel(target, creds) as ch:
            out = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(request("linear", input=X), timeout=10)
        assert out.model_spec.version.value == 1
    finally:
        srv.stop()


def _cert(tmp: Path, name: str, issuer: tuple[Any, Any] | None, dns: str | None = None) -> tuple[Any, Any]:
    """A P-256 key and certificate (a CA when ``issuer`` is None), written to tmp/name.key and name.pem."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(subject if issuer is None else issuer[1].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns)]), critical=False)
    cert = builder.sign(key if issuer is None else issuer[0], hashes.SHA256())
    (tmp / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    (tmp / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def test_a_taken_port_stops_the_agent_with_a_clear_message(tmp_path: Path) -> None:
    """`edge-agent run` with [grpc] on a port that is taken exits 1 naming the address, no traceback (as
    [http] does): a second agent must not silently share the port."""
    import socket
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    port = sock.getsockname()[1]
    config = tmp_path / "agent.toml"
    config.write_text(f'device_id = "x"\n[store]\npath = "{tmp_path / "store"}"\n[grpc]\nenabled = true\nport = {port}\n')
    try:
        proc = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert proc.returncode == 1, proc.stderr
    assert f"grpc: cannot serve on 127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_reload_restarts_the_grpc_api_with_its_new_settings(tmp_path: Path) -> None:
    """SIGHUP's path (Agent.reload): a changed [grpc] restarts the server with it; a port it cannot bind is
    refused and the running server comes back; enabled = false turns it off."""
    import socket

    from edge_agent.agent import Agent
    from edge_agent.config import parse_config
    from edge_agent.errors import ConfigError

    def config(**grpc_keys: Any) -> Any:
        return parse_config({"device_id": "grpc-test", "log_level": "warning", "store": {"path": str(tmp_path / "s")},
                             "grpc": {"enabled": True, "port": 0, **grpc_keys}})

    def answers(agent: Agent) -> grpc.StatusCode:
        host, port = agent.grpc.address
        with grpc.insecure_channel(f"{host}:{port}") as ch:
            stub = model_service_pb2_grpc.ModelServiceStub(ch)
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name = "junk"
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModelStatus(req, timeout=10)
            return err.value.code()

    agent = Agent(config())
    agent.start()
    try:
        first = agent.grpc
        assert answers(agent) == grpc.StatusCode.NOT_FOUND
        assert agent.reload(config(workers=2)) == ["grpc restarted"]
        assert agent.grpc is not first and agent.grpc.workers == 2 and answers(agent) == grpc.StatusCode.NOT_FOUND
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        try:
            with pytest.raises(ConfigError, match="grpc: cannot serve on"):
                agent.reload(config(port=taken.getsockname()[1]))
        finally:
            taken.close()
        assert agent.grpc.workers == 2 and answers(agent) == grpc.StatusCode.NOT_FOUND  # the running settings
        assert agent.reload(config(enabled=False)) == ["grpc off"]
        assert agent.grpc is None
    finally:
        agent.shutdown()


def test_rest_and_grpc_metadata_name_every_signature_dtype_alike() -> None:
    """One dtype table serves both APIs: a client reading metadata over REST (DT_* as text) and gRPC (the
    enum) sees the same TensorFlow dtype for every dtype a signature can hold."""
    from edge_agent.http.rest import tensor_info_json
    from edge_agent.serving.signature import DTYPES, TensorInfo

    for dtype in DTYPES:
        assert DT.Name(tensors.DTYPE_OF_NAME[dtype]) == tensor_info_json(TensorInfo("t", dtype, [-1]))["dtype"]

"""The serving core (edge_agent.serving): raw named tensors in, every output
out, for any model, with TF Serving's status codes and wording, on real ONNX
Runtime sessions of tiny models built in code."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import numpy as np
import pytest

from edge_agent.errors import ModelNotAvailable
from edge_agent.models.servable import ModelStats
from edge_agent.runtimes import create_runtime, describe_model
from edge_agent.serving import Predictor, ServingError, TensorInfo, signature_of
from edge_agent.serving.predict import cast_input


def half_plus_two(path: Path) -> Path:
    """TF Serving's README model as ONNX: y = 0.5 * x + 2, x of shape [None]."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "half"], ["t"]), helper.make_node("Add", ["t", "two"], ["y"])],
        "half_plus_two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                     helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    return _save(graph, path)


def two_inputs(path: Path) -> Path:
    """Named inputs a [N, 3] float and b [N, 3] int64; outputs sum = a + b, prod = a * b."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["a", "bf"], ["sum"]), helper.make_node("Mul", ["a", "bf"], ["prod"])],
        "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 3])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("prod", TensorProto.FLOAT, ["N", 3])],
    )
    return _save(graph, path)


def _save(graph: Any, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


class FakeManager:
    """The manager's reads and ``acquire``, over real runtimes: version 1
    of each model loaded, version 2 installed only."""

    def __init__(self, **models: Any) -> None:
        self.models = models

    def status(self) -> dict[str, Any]:
        return {n: {"versions": [1, 2], "labels": {"stable": 1}, "loaded": [1], "failed": {"2": "smoke test"}}
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
    manifest = SimpleNamespace(inputs=inputs, outputs=outputs)
    return SimpleNamespace(name=name, version=1, manifest=manifest, runtime=runtime, stats=ModelStats())


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    tmp = tmp_path_factory.mktemp("serving")
    return Predictor(FakeManager(half_plus_two=loaded(half_plus_two(tmp / "hpt.onnx"), "half_plus_two"),
                                 two=loaded(two_inputs(tmp / "two.onnx"), "two")))


def test_half_plus_two_answers_as_in_tf_servings_readme(predictor: Predictor) -> None:
    """The seed's own example: raw tensors in, raw tensors out, any batch size on a dynamic dimension."""
    result = predictor.predict("half_plus_two", {"x": np.array([1.0, 2.0, 5.0], np.float32)})
    assert (result.model, result.version) == ("half_plus_two", 1)
    assert list(result.outputs) == ["y"]
    np.testing.assert_array_equal(result.outputs["y"], [2.5, 3.0, 4.5])


def test_signature_keeps_dynamic_dimensions_and_names(predictor: Predictor) -> None:
    """A dynamic batch dimension is -1 in the signature, never the 1 a warm-up ran at."""
    version, sig = predictor.resolve("two")
    assert version == 1
    assert sig.inputs == {"a": TensorInfo("a", "float32", [-1, 3]), "b": TensorInfo("b", "int64", [-1, 3])}
    assert list(sig.outputs) == ["sum", "prod"] and sig.outputs["sum"].shape == [-1, 3]
    assert sig.method_name == "tensorflow/serving/predict"


def test_two_named_inputs_give_every_output(predictor: Predictor) -> None:
    """A model with several inputs is called by name and answers all its outputs (or those asked for)."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((2, 3), np.int64) * 2
    result = predictor.predict("two", {"a": a, "b": b})
    np.testing.assert_array_equal(result.outputs["sum"], a + 2)
    np.testing.assert_array_equal(result.outputs["prod"], a * 2)
    only = predictor.predict("two", {"a": a, "b": b}, output_filter=["prod"], signature_name="serving_default")
    assert list(only.outputs) == ["prod"]


def test_lossless_casts_are_made_and_lossy_ones_refused(predictor: Predictor) -> None:
    """Ints where floats are taken (and float64 within float32's range) are cast as TF Serving's JSON parser
    does; a float where an int is taken is refused, naming the input and both dtypes."""
    out = predictor.predict("two", {"a": [[1, 2, 3]], "b": np.array([[1, 1, 1]], np.int32)})
    np.testing.assert_array_equal(out.outputs["sum"], [[2, 3, 4]])
    with pytest.raises(ServingError) as err:
        predictor.predict("two", {"a": [[1.0, 2.0, 3.0]], "b": [[1.5, 1.0, 1.0]]})
    assert err.value.code == "INVALID_ARGUMENT" and "'b'" in err.value.message and "int64" in err.value.message
    with pytest.raises(ServingError, match="expects string"):
        cast_input(TensorInfo("s", "string", [-1]), np.array([1, 2]))
    assert cast_input(TensorInfo("s", "string", [-1]), ["x", "y"]).dtype == object


@pytest.mark.parametrize("call, code, words", [
    (dict(name="two", inputs={"a": [[1.0, 2.0, 3.0]]}), "INVALID_ARGUMENT",
     "input size does not match signature: 1!=2 len({a}) != len({a,b}). Sent extra: {}. Missing but required: {b}."),
    (dict(name="two", inputs={"a": [[1.0, 2.0, 3.0]], "c": [[1, 1, 1]]}), "INVALID_ARGUMENT", "Sent extra: {c}"),
    (dict(name="two", inputs={"a": [[1.0, 2.0]], "b": [[1, 1]]}), "INVALID_ARGUMENT",
     "input 'a': shape [1, 2] does not match the signature's [-1, 3]"),
    (dict(name="two", inputs={"a": [1.0, 2.0, 3.0], "b": [[1, 1, 1]]}), "INVALID_ARGUMENT", "input 'a': shape [3]"),
    (dict(name="half_plus_two", inputs={"x": [1.0]}, signature_name="nope"), "FAILED_PRECONDITION",
     'Serving signature key "nope" not found.'),
    (dict(name="junk", inputs={"x": [1.0]}), "NOT_FOUND", "Servable not found for request: Latest(junk)"),
    (dict(name="half_plus_two", inputs={"x": [1.0]}, version=7), "NOT_FOUND",
     "Servable not found for request: Specific(half_plus_two, 7)"),
    (dict(name="half_plus_two", inputs={"x": [1.0]}, label="canary"), "NOT_FOUND",
     "Unrecognized servable version label: canary"),
    (dict(name="half_plus_two", inputs={"x": [1.0]}, output_filter=["z"]), "INVALID_ARGUMENT",
     "output tensor alias not found in signature: z"),
])
def test_bad_requests_get_tf_servings_code_and_a_message_naming_the_fault(
        predictor: Predictor, call: dict[str, Any], code: str, words: str) -> None:
    """Each refusal carries the status code TF Serving gives it and says what is wrong, so REST and gRPC
    answer a client the same."""
    name, inputs = call.pop("name"), call.pop("inputs")
    with pytest.raises(ServingError) as err:
        predictor.predict(name, inputs, **call)
    assert err.value.code == code and words in err.value.message, err.value


def test_status_reports_each_version_as_get_model_status(predictor: Predictor) -> None:
    """AVAILABLE while loaded, END with the reason when a version failed; unknown models and versions are
    NOT_FOUND."""
    states = predictor.status("two")
    assert [(s.version, s.state, s.error_code) for s in states] == [(2, "END", "FAILED_PRECONDITION"),
                                                                     (1, "AVAILABLE", "OK")]
    assert predictor.status("two", 1)[0].state == "AVAILABLE"
    with pytest.raises(ServingError, match="Could not find version 9 of model two"):
        predictor.status("two", 9)
    with pytest.raises(ServingError, match="Could not find any versions of model junk"):
        predictor.status("junk")


def test_a_label_picks_its_version_and_counts_in_the_stats(predictor: Predictor) -> None:
    """A labelled version answers; every batch element is counted in the version's stats, as frames are."""
    model = predictor.models.models["half_plus_two"]  # type: ignore[attr-defined]
    before = model.stats.snapshot()[0]
    result = predictor.predict("half_plus_two", {"x": np.zeros(4, np.float32)}, label="stable")
    assert result.version == 1 and model.stats.snapshot()[0] == before + 4


def test_signature_of_a_quantized_tensor_is_float() -> None:
    """The runtime quantizes what a client sends: the signature says float32, not int8."""
    from edge_agent.bundles.manifest import Quantization, TensorSpec

    spec = TensorSpec(name="in", shape=[None, 4], dtype="int8", quantization=Quantization(scale=0.1, zero_point=0))
    manifest = SimpleNamespace(inputs=[spec], outputs=[spec.model_copy(update={"name": "out"})])
    assert signature_of(manifest).inputs["in"] == TensorInfo("in", "float32", [-1, 4])


def test_onnx_run_takes_named_inputs_and_keeps_output_dtypes(tmp_path: Path) -> None:
    """Runtime.run: every input by name, every output by name in the model's own dtype."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ArgMax", ["x"], ["idx"], axis=1, keepdims=0), helper.make_node("Identity", ["x"], ["same"])],
        "argmax",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("same", TensorProto.DOUBLE, ["N", 4])],
    )
    path = _save(graph, tmp_path / "argmax.onnx")
    inputs, outputs = describe_model(path, "onnx")
    assert [t.dtype for t in inputs] == ["float64"] and [t.dtype for t in outputs] == ["int64", "float64"]
    runtime = create_runtime("onnx", path, inputs, outputs, threads=1)
    runtime.load()
    out = runtime.run({"x": np.array([[0, 3, 1, 2], [5, 0, 0, 0]], np.float64)})
    assert out["idx"].dtype == np.int64 and out["idx"].tolist() == [1, 0]
    assert out["same"].dtype == np.float64


def test_a_large_batch_is_counted_in_one_stats_call(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row counts as a frame, but a 3-million-row columnar request (15 MB of JSON, under the body limit)
    spent 1.3 s here in 3 million per-row stats calls after its inference: one call counts them all."""
    model = predictor.models.models["half_plus_two"]  # type: ignore[attr-defined]
    frames, _, _ = model.stats.snapshot()
    buckets, total_s = model.stats.histogram()
    calls: list[int] = []
    real_ok = model.stats.ok
    monkeypatch.setattr(model.stats, "ok", lambda ms, count=1: (calls.append(count), real_ok(ms, count=count)))
    predictor.predict("half_plus_two", {"x": np.zeros(100_000, np.float32)})
    assert calls == [100_000]
    assert model.stats.snapshot()[0] == frames + 100_000
    assert model.stats.histogram()[0][-1][1] == buckets[-1][1] + 100_000  # the +Inf bucket counts every row

"""TF Serving's REST API for any model (issue 15), as its users try it: the
seeds' own examples (TF Serving's README ``half_plus_two`` with the real
curl, the ONNX tutorial's PyTorch ``nn.Linear(4, 1)``), packed with
``edge-agent pack --task tensor`` and served by a real agent over real
HTTP, answered as ``onnxruntime`` answers them directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_http import call, start_agent
from test_serving import half_plus_two, two_inputs

pytestmark = pytest.mark.integration


def pack_tensor(model: Path, name: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent pack MODEL --task tensor`` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "edge_agent", "pack", str(model), "--name", name, "--version", "1",
                           "--out", str(out), "--task", "tensor", *extra],
                          capture_output=True, text=True, timeout=120, env={**os.environ})


def linear(path: Path, *, dynamic: bool) -> Path:
    """The ONNX tutorial's model: ``nn.Linear(4, 1)`` exported with input_names=["input"],
    output_names=["output"] (opset 17), the batch dynamic as the tutorial makes it, or static [1, 4]."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).eval()
    kwargs: dict[str, Any] = {}
    if dynamic:
        kwargs["dynamic_axes"] = {"input": {0: "batch_size"}, "output": {0: "batch_size"}}
    torch.onnx.export(model, torch.randn(1, 4), str(path), input_names=["input"], output_names=["output"],
                      opset_version=17, dynamo=False, **kwargs)
    return path


def echo(path: Path) -> Path:
    """A string model: text [N] in, the same text [N] out (StringNormalizer would need a system locale)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """An agent serving half_plus_two, the tutorial's Linear (dynamic and static batch) and a two-input model,
    each packed with ``pack --task tensor``."""
    tmp = tmp_path_factory.mktemp("tensor")
    files = {
        "half_plus_two": half_plus_two(tmp / "half_plus_two.onnx"),
        "linear": linear(tmp / "linear.onnx", dynamic=True),
        "linear_static": linear(tmp / "linear_static.onnx", dynamic=False),
        "two": two_inputs(tmp / "two.onnx"),
        "echo": echo(tmp / "echo.onnx"),
    }
    models = []
    for name, path in files.items():
        done = pack_tensor(path, name, tmp / f"{name}-bundle")
        assert done.returncode == 0, done.stderr
        models.append({"name": name, "bundle": str(tmp / f"{name}-bundle"), "threads": 1})
    agent, base = start_agent(tmp, models, [])
    yield agent, base, files
    agent.shutdown()


def test_tf_servings_readme_curl_answers_as_in_the_readme(served) -> None:
    """TF Serving's README example, run exactly as written with the real curl: a new user's first request."""
    agent, base, _ = served
    port = base.rsplit(":", 1)[1]
    done = subprocess.run(
        ["curl", "-s", "-d", '{"instances": [1.0, 2.0, 5.0]}', "-X", "POST",
         f"http://localhost:{port}/v1/models/half_plus_two:predict"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"predictions": [2.5, 3.0, 4.5]}


def test_the_readme_model_in_every_form_tf_serving_takes(served) -> None:
    """Scalars per instance, named-object instances, columnar list and object, the default signature named:
    one answer, under "predictions" for rows and "outputs" for columns, never both."""
    _, base, _ = served
    url = "/v1/models/half_plus_two:predict"
    assert call(base, url, {"instances": [{"x": 1.0}, {"x": 2.0}, {"x": 5.0}]}) == (200, {"predictions": [2.5, 3.0, 4.5]})
    assert call(base, url, {"signature_name": "serving_default", "instances": [1, 2, 5]}) == \
        (200, {"predictions": [2.5, 3.0, 4.5]})
    assert call(base, url, {"inputs": [1.0, 2.0, 5.0]}) == (200, {"outputs": [2.5, 3.0, 4.5]})
    assert call(base, url, {"inputs": {"x": [1.0, 2.0, 5.0]}}) == (200, {"outputs": [2.5, 3.0, 4.5]})
    assert call(base, "/v1/models/half_plus_two/versions/1:predict", {"instances": [0.0]}) == \
        (200, {"predictions": [2.0]})


def test_the_onnx_tutorial_linear_model_answers_as_onnxruntime(served) -> None:
    """nn.Linear(4, 1) exported as the tutorial does: row and columnar answers equal onnxruntime run directly,
    for a dynamic batch and for the static [1, 4] export."""
    import onnxruntime as ort

    _, base, files = served
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    session = ort.InferenceSession(str(files["linear"]), providers=["CPUExecutionProvider"])
    (want,) = session.run(["output"], {"input": x})
    status, rows = call(base, "/v1/models/linear:predict", {"instances": x.tolist()})
    assert status == 200 and set(rows) == {"predictions"}
    np.testing.assert_allclose(rows["predictions"], want, rtol=1e-6)
    status, cols = call(base, "/v1/models/linear:predict", {"inputs": {"input": x.tolist()}})
    assert status == 200 and set(cols) == {"outputs"}
    np.testing.assert_allclose(cols["outputs"], want, rtol=1e-6)
    status, named = call(base, "/v1/models/linear:predict", {"instances": [{"input": r} for r in x.tolist()]})
    assert status == 200 and named == rows

    static = ort.InferenceSession(str(files["linear_static"]), providers=["CPUExecutionProvider"])
    (one,) = static.run(["output"], {"input": x[:1]})
    status, body = call(base, "/v1/models/linear_static:predict", {"instances": x[:1].tolist()})
    assert status == 200
    np.testing.assert_allclose(body["predictions"], one, rtol=1e-6)
    status, body = call(base, "/v1/models/linear_static:predict", {"inputs": x[:1].tolist()})
    assert status == 200
    np.testing.assert_allclose(body["outputs"], one, rtol=1e-6)


def test_metadata_reports_dynamic_dims_as_minus_one(served) -> None:
    """A client sizes its requests from the metadata: the dynamic batch is "-1" (it was "1" before issue 15),
    a static one stays "1"; dtypes are TF Serving's names."""
    _, base, _ = served
    status, meta = call(base, "/v1/models/linear/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "linear", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["method_name"] == "tensorflow/serving/predict"
    assert sig["inputs"] == {"input": {"dtype": "DT_FLOAT", "name": "input", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": "4", "name": ""}], "unknown_rank": False}}}
    assert [d["size"] for d in sig["outputs"]["output"]["tensor_shape"]["dim"]] == ["-1", "1"]
    assert meta["edge_agent"]["task"] == "tensor" and meta["edge_agent"]["preprocessing"] is None
    status, meta = call(base, "/v1/models/linear_static/metadata")
    dims = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["input"]["tensor_shape"]
    assert [d["size"] for d in dims["dim"]] == ["1", "4"]
    status, meta = call(base, "/v1/models/two/metadata")
    inputs = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]
    assert {k: v["dtype"] for k, v in inputs.items()} == {"a": "DT_FLOAT", "b": "DT_INT64"}


def test_a_model_with_two_named_inputs_row_and_columnar(served) -> None:
    """Several named inputs, row format (an object per instance) and columnar (an object of tensors); several
    outputs answered as objects by name."""
    _, base, _ = served
    a = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    b = [[1, 1, 1], [2, 2, 2]]
    status, rows = call(base, "/v1/models/two:predict", {"instances": [{"a": a[0], "b": b[0]}, {"a": a[1], "b": b[1]}]})
    assert status == 200, rows
    assert rows == {"predictions": [{"sum": [2.0, 3.0, 4.0], "prod": [1.0, 2.0, 3.0]},
                                    {"sum": [6.0, 7.0, 8.0], "prod": [8.0, 10.0, 12.0]}]}
    status, cols = call(base, "/v1/models/two:predict", {"inputs": {"a": a, "b": b}})
    assert status == 200
    assert cols == {"outputs": {"sum": [[2.0, 3.0, 4.0], [6.0, 7.0, 8.0]], "prod": [[1.0, 2.0, 3.0], [8.0, 10.0, 12.0]]}}


def test_string_inputs_take_text_and_b64_utf8_and_refuse_other_bytes(served) -> None:
    """TF Serving's REST API sends binary strings as ``{"b64": ...}``; an ONNX
    model's string tensors hold text, and onnxruntime fed raw bytes answers
    from their repr (``"b'\\xff'"``) without a word. So b64 that is UTF-8 is
    the text it encodes, and other bytes are refused (400, naming the input),
    as the gRPC API refuses such a DT_STRING."""
    import base64

    _, base, _ = served
    naive = {"b64": base64.b64encode("naïve".encode()).decode()}
    status, rows = call(base, "/v1/models/echo:predict", {"instances": ["café", naive]})
    assert status == 200, rows
    assert rows == {"predictions": ["café", "naïve"]}
    status, cols = call(base, "/v1/models/echo:predict", {"inputs": {"text": [naive, "x"]}})
    assert (status, cols) == (200, {"outputs": ["naïve", "x"]})
    status, answer = call(base, "/v1/models/echo:predict",
                          {"instances": ["ok", {"b64": base64.b64encode(b"\xff\xfe").decode()}]})
    assert status == 400, answer
    assert "input 'text': string value 1 is not UTF-8 text" in answer["error"]
    status, answer = call(base, "/v1/models/echo:predict", {"instances": [1.5]})
    assert status == 400 and 'JSON Value: 1.5 Type: Number is not of expected type: string' in answer["error"]


@pytest.mark.parametrize("path, body, status, words", [
    ("two", {"instances": [{"a": [1.0, 2.0, 3.0], "c": [1, 1, 1]}]}, 400, "must only have keys: a,b"),
    ("two", {"inputs": {"a": [[1.0, 2.0, 3.0]]}}, 400, "Missing named input: b in 'inputs' object"),
    ("two", {"instances": [[1.0, 2.0, 3.0]]}, 400, "expecting list of objects as multiple input tensors"),
    ("two", {"inputs": [[1.0, 2.0, 3.0]]}, 400, "expecting an object as multiple input tensors"),
    ("linear", {"instances": [[1.0, 2.0, 3.0]]}, 400, "shape [3], the model's input 'input' takes [4] per instance"),
    ("linear", {"inputs": [1.0, 2.0, 3.0, 4.0]}, 400, "input 'input': shape [4] does not match the signature's [-1, 4]"),
    ("linear", {"instances": [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0]]}, 400, "shape [2]"),
    ("linear", {"instances": [["a", "b", "c", "d"]]}, 400, 'JSON Value: "a" Type: String is not of expected type: float'),
    ("linear", {"instances": [[True, False, True, False]]}, 400, "Type: Bool is not of expected type: float"),
    ("two", {"inputs": {"a": [[1.0, 2.0, 3.0]], "b": [[1.5, 1, 1]]}}, 400,
     "JSON Value: 1.5 Type: Number is not of expected type: int64"),
    ("linear", {"signature_name": "serving_default"}, 400, "Missing 'inputs' or 'instances' key"),
    ("linear", {"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}, 400, "only one of 'inputs' or 'instances'"),
    ("linear", {"instances": [[1, 2, 3, 4]], "signature_name": "nope"}, 400,
     'Serving signature name: "nope" not found in signature def'),
    ("junk", {"instances": [1.0]}, 404, "Servable not found for request: Latest(junk)"),
    ("linear/versions/7", {"instances": [[1, 2, 3, 4]]}, 404, "Servable not found for request: Specific(linear, 7)"),
    ("linear/labels/canary", {"instances": [[1, 2, 3, 4]]}, 404, "Unrecognized servable version label: canary"),
    ("linear/versions/x", {"instances": [[1, 2, 3, 4]]}, 400, "Failed to convert version: x to numeric"),
])
def test_bad_input_gets_tf_servings_status_and_names_the_fault(served, path: str, body: Any, status: int,
                                                               words: str) -> None:
    """Wrong input names, shapes or dtypes, a missing instances/inputs, an unknown signature, model, version or
    label: each the status code TF Serving answers it with, and a message naming what is wrong."""
    _, base, _ = served
    got, answer = call(base, f"/v1/models/{path}:predict", body)
    assert got == status and words in answer["error"], answer


def test_classify_and_regress_say_they_are_not_supported(served) -> None:
    """TF Serving's other two verbs exist in its API; here they are a clear 501, pointing at :predict."""
    _, base, _ = served
    for verb in ("classify", "regress"):
        status, body = call(base, f"/v1/models/linear:{verb}", {"examples": [{"x": 1.0}]})
        assert status == 501 and "not supported" in body["error"] and ":predict" in body["error"]


def test_a_tensor_model_is_counted_and_versioned_like_any_other(served) -> None:
    """Status in TF Serving's shape and the model's stats count each instance, as for a camera model."""
    agent, base, _ = served
    status, body = call(base, "/v1/models/half_plus_two")
    assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
    before = agent.models.model_stats()["half_plus_two"]["frames"]
    call(base, "/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0]})
    assert agent.models.model_stats()["half_plus_two"]["frames"] == before + 2


# -- pack --task tensor and the config -------------------------------------------


def test_pack_tensor_records_inputs_and_outputs_with_dynamic_dims(tmp_path: Path) -> None:
    """The manifest of a tensor model: every input and output with its dtype and dynamic dimensions (-1 as
    null), no preprocessing or postprocessing; preprocessing options are refused, not ignored."""
    done = pack_tensor(two_inputs(tmp_path / "two.onnx"), "two", tmp_path / "b")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["task"] == "tensor" and manifest["preprocessing"] is None and manifest["postprocessing"] is None
    assert [(t["name"], t["dtype"], t["shape"]) for t in manifest["inputs"]] == [
        ("a", "float32", [None, 3]), ("b", "int64", [None, 3])]
    assert [t["name"] for t in manifest["outputs"]] == ["sum", "prod"]
    done = pack_tensor(tmp_path / "two.onnx", "two", tmp_path / "c", "--size", "8x8")
    assert done.returncode == 2 and "size do not apply" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "edge_agent", "pack", str(tmp_path / "two.onnx"), "--name", "two",
                           "--version", "1", "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--task tensor" in done.stderr  # a camera model takes one image: says what to do


def test_a_source_bound_to_a_tensor_model_is_a_config_error(tmp_path: Path) -> None:
    """`edge-agent run` with a camera feeding a tensor model stops at once with exit 2, naming the file and the
    source's model key, rather than failing every frame."""
    done = pack_tensor(half_plus_two(tmp_path / "hpt.onnx"), "half_plus_two", tmp_path / "bundle")
    assert done.returncode == 0, done.stderr
    frames = tmp_path / "frames"
    frames.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(textwrap.dedent(f"""\
        device_id = "t"
        [store]
        path = "{tmp_path / 'store'}"
        [[models]]
        name = "half_plus_two"
        bundle = "{tmp_path / 'bundle'}"
        [[sources]]
        name = "cam"
        uri = "{frames}"
        model = "half_plus_two"
        """))
    done = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{config}: sources[0] (cam).model: 'half_plus_two' is a tensor model" in done.stderr
    assert "Traceback" not in done.stderr

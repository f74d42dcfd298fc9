"""``edge-agent bench``: real MobileNetV2 (ONNX Runtime) against real
BlazeFace (LiteRT) and a bare model file, through the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_times_bundles_and_files_side_by_side(assets, mobilenet_bundle, blazeface_bundle) -> None:
    photo = assets["photos"] / "chelsea.jpg"
    proc = bench(str(mobilenet_bundle), str(blazeface_bundle), str(assets["mobilenet_v2"]),
                 "--rounds", "2", "--runs", "3", "--image", str(photo), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["settings"] == {"threads": 1, "rounds": 2, "runs": 3, "warmup": 3, "image": "given"}
    base, face, bare = report["models"]
    assert report["baseline"] == base["model"] == "mobilenet_v2 v1 onnx fp32"
    assert face["model"] == "blazeface v1 tflite fp32" and face["runtime"] == "tflite"
    assert bare["model"] == "mobilenet_v2.onnx onnx" and "frame_ms" not in bare  # no preprocessing known
    assert base["infer_speedup"] == 1.0 and base["size_ratio"] == 1.0
    # BlazeFace (128x128, 0.1 M parameters) is far smaller and faster than MobileNetV2.
    assert face["size_ratio"] < 0.2 and face["infer_speedup"] > 2
    assert base["size_mb"] == bare["size_mb"]
    for m in (base, face):
        # A frame also pays for preprocessing; the two medians come from
        # separate timed loops, so on a loaded machine they may cross by
        # noise (seen: infer 12.566 ms, frame 12.548 ms under full load).
        assert 0 < m["infer_ms"] and m["frame_ms"] > 0.9 * m["infer_ms"]
        assert m["fps"] == pytest.approx(1000 / m["frame_ms"], rel=0.01)
        assert m["rss_mb"] is not None and m["load_ms"] > 0


def test_bench_expands_a_directory_of_bundles_and_prints_a_table(mobilenet_bundle, blazeface_bundle,
                                                                  tmp_path) -> None:
    out = tmp_path / "quantized"
    out.mkdir()
    shutil.copytree(blazeface_bundle, out / "b-face")
    shutil.copytree(mobilenet_bundle, out / "a-mobilenet")
    (out / "report.json").write_text("{}")  # what quantize also writes there: not a model, left out
    proc = bench(str(out), "--rounds", "1", "--runs", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "speed-up against mobilenet_v2 v1 onnx fp32" in lines[0]
    assert [ln.split()[0] for ln in lines[2:4]] == ["mobilenet_v2", "blazeface"]
    assert "loaded blazeface v1 tflite fp32" in proc.stderr


def test_bad_input_is_a_clear_error_with_exit_2(tmp_path, mobilenet_bundle) -> None:
    import onnx
    from onnx import TensorProto, helper

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    # An ONNX model whose height and width are dynamic: timing needs a size.
    dyn = tmp_path / "dynamic.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), dyn)
    cases = [
        ([str(tmp_path / "missing.onnx")], "not found"),
        ([str(text)], "expected a .onnx or .tflite file"),
        ([str(empty)], "neither a bundle nor holds bundles"),
        ([str(dyn)], "--size WxH"),
        ([str(mobilenet_bundle), "--image", str(text)], "not a picture"),
    ]
    for args, words in cases:
        proc = bench(*args, "--rounds", "1", "--runs", "1")
        assert proc.returncode == 2, (args, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)

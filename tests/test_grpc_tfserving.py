"""A real TF Serving client against a real agent: TF Serving's own Python
package (tensorflow-serving-api, with TensorFlow, in its own environment made
by scripts/setup_tfserving_client.sh beside the converter env) calls
`edge-agent run` serving the ONNX tutorial's nn.Linear(4, 1), exported as the
tutorial exports it and packed with --task tensor. The client is
tests/tfserving_client.py, written as TF Serving's examples write theirs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="the grpc extra (grpcio) is not installed")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CLIENT = Path(__file__).resolve().parent / "tfserving_client.py"


@pytest.fixture(scope="module")
def tfserving_python() -> Path:
    """TF Serving's client environment: skipped only when the converter env it builds on is absent;
    made here (a few seconds) when it is missing."""
    base = Path(os.environ.get("EDGE_AGENT_ONNX2TF_VENV") or "~/.cache/edge-agent/onnx2tf-venv").expanduser()
    if not (base / "bin" / "python").exists():
        pytest.skip(f"the converter env ({base}) is missing: scripts/setup_onnx2tf.sh makes it, and "
                    "scripts/setup_tfserving_client.sh TF Serving's client beside it")
    proc = subprocess.run([str(ROOT / "scripts" / "setup_tfserving_client.sh")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    venv = Path(os.environ.get("EDGE_AGENT_TFSERVING_VENV") or "~/.cache/edge-agent/tfserving-client-venv")
    return venv.expanduser() / "bin" / "python"


def export_tutorial_model(path: Path) -> Path:
    """The ONNX tutorial's model, exported as the tutorial does (dynamo=False: the TorchScript exporter the
    tutorial used; torch 2.9+'s default one needs onnxscript). Its input is the static [1, 4]."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(4, 1)
    torch.onnx.export(model, torch.randn(1, 4), str(path), input_names=["input"], output_names=["output"],
                      dynamo=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`edge-agent run` with [grpc] on, serving the tutorial model as `linear` (version 1)."""
    tmp = tmp_path_factory.mktemp("grpc-agent")
    onnx_path = export_tutorial_model(tmp / "model.onnx")
    pack = subprocess.run([sys.executable, "-m", "edge_agent", "pack", str(onnx_path), "--name", "linear",
                           "--version", "1", "--task", "tensor", "--out", str(tmp / "bundle")],
                          capture_output=True, text=True, timeout=120)
    assert pack.returncode == 0, pack.stderr
    port = free_port()
    config = tmp / "agent.toml"
    config.write_text(f'device_id = "grpc-test"\n[store]\npath = "{tmp / "store"}"\n'
                      f'[[models]]\nname = "linear"\nbundle = "{tmp / "bundle"}"\n'
                      f'[grpc]\nenabled = true\nport = {port}\n')
    log = open(tmp / "agent.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
        yield target, onnx_path
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
        text = (tmp / "agent.log").read_text()
        assert code == 0 and "Traceback" not in text, text


def test_tf_servings_own_client_gets_what_onnxruntime_gives(tfserving_python: Path, agent: tuple[str, Path],
                                                            tmp_path: Path) -> None:
    """The point of wire compatibility: a client written against tensorflow_serving.apis (PredictionServiceStub,
    tf.make_tensor_proto, tf.make_ndarray) works unchanged, and its answer equals onnxruntime's on the same
    model; metadata, status and the error codes read as TF Serving's own."""
    import onnxruntime

    target, onnx_path = agent
    x = np.random.default_rng(1).normal(size=(1, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    started = time.monotonic()
    proc = subprocess.run([str(tfserving_python), str(CLIENT), target, "linear", "input", "output",
                           str(tmp_path / "x.npy"), str(tmp_path / "out.json")],
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    want = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert (out["dtype"], out["shape"]) == ("float32", [1, 1])
    np.testing.assert_array_equal(np.asarray(out["output"], np.float32), want)
    assert out["model_spec"] == ["linear", 1, "serving_default"]
    assert out["signature"]["method_name"] == "tensorflow/serving/predict"
    assert out["signature"]["inputs"] == {"input": ["float32", [1, 4]]}
    assert out["signature"]["outputs"] == {"output": ["float32", [1, 1]]}
    assert out["status"] == [[1, "AVAILABLE"]]
    assert out["unknown_model"][0] == "NOT_FOUND" and "no_such_model" in out["unknown_model"][1]
    assert out["wrong_input"][0] == "INVALID_ARGUMENT" and "not_input" in out["wrong_input"][1]
    assert time.monotonic() - started < 180

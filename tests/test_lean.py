"""The device side stays lean: `edge-agent run` never imports workstation tools."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

HEAVY = ("onnx", "torch", "tensorflow", "quantize", "cryptography", "onnxruntime.quantization")


def loaded_after_importing(modules: str, candidates: tuple[str, ...]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter has in ``sys.modules`` after
    importing ``modules`` (comma-separated)."""
    code = f"import sys; import {modules}; print([m for m in {candidates!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip())


def test_agent_imports_no_workstation_tools() -> None:
    """A 1 GB Pi must not pay for onnx, torch, TensorFlow or the quantizer."""
    assert loaded_after_importing("edge_agent.cli, edge_agent.agent, edge_agent.comms.mqtt, edge_agent.runtimes.onnx, "
                                  "edge_agent.http.server, edge_agent.bench", HEAVY) == []


def test_the_bundle_device_path_imports_no_packing_signing_or_runtimes() -> None:
    """Opening and verifying a bundle (edge_agent.bundles) stays what the device needs:
    not the workstation's packing code, not the runtimes it describes models with, not
    the preprocessing, and no Ed25519 until a signature is checked."""
    assert loaded_after_importing("edge_agent.bundles", (
        "edge_agent.bundles.pack", "edge_agent.bundles.signing", "edge_agent.runtimes",
        "edge_agent.pipeline.preprocess", "cryptography", "numpy", "cv2")) == []


def test_agent_imports_no_bundle_packing() -> None:
    """`edge-agent run` and the device's commands open bundles; only `pack`, the quantizer and the
    fleet console make them."""
    assert loaded_after_importing(
        "edge_agent.cli, edge_agent.agent, edge_agent.models.store, edge_agent.models.lifecycle, edge_agent.comms.plane,"
        " edge_agent.comms.handlers, edge_agent.http.server, edge_agent.bench", ("edge_agent.bundles.pack",)) == []


def _modules_after_agent_run(tmp_path, grpc_section: dict) -> list[str]:
    """Which of grpc / protobuf / tensorflow a fresh interpreter holds after an Agent (the object
    `edge-agent run` builds) has started and stopped with ``[grpc]`` = ``grpc_section`` and HTTP on."""
    code = f"""
import sys

import pytest
from edge_agent.agent import Agent
from edge_agent.config import parse_config
agent = Agent(parse_config({{"store": {{"path": {str(tmp_path / 'store')!r}}}, "http": {{"enabled": True, "port": 0}},
                            "grpc": {grpc_section!r}}}))
agent.start()
agent.shutdown()
print([m for m in ("grpc", "google.protobuf", "tensorflow") if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return ast.literal_eval(out.strip().splitlines()[-1])


def test_run_without_grpc_never_imports_grpcio(tmp_path) -> None:
    """grpcio and protobuf cost a Pi memory and start-up time: `edge-agent run` loads them only when
    [grpc] enabled = true (and TensorFlow never, even then)."""
    assert loaded_after_importing("edge_agent.cli, edge_agent.agent, edge_agent.serving, edge_agent.http.server",
                                  ("grpc", "google.protobuf")) == []
    assert _modules_after_agent_run(tmp_path, {}) == []
    pytest.importorskip("grpc", reason="the grpc extra is not installed")
    assert _modules_after_agent_run(tmp_path, {"enabled": True, "port": 0}) == ["grpc", "google.protobuf"]

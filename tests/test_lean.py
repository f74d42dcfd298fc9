"""The device side stays lean: `edge-agent run` never imports workstation tools."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("onnx", "torch", "tensorflow", "quantize", "cryptography", "onnxruntime.quantization")


def test_agent_imports_no_workstation_tools() -> None:
    """A 1 GB Pi must not pay for onnx, torch, TensorFlow or the quantizer."""
    code = (
        "import sys; import edge_agent.cli, edge_agent.agent, edge_agent.comms.mqtt, edge_agent.runtimes.onnx, edge_agent.http.server, edge_agent.bench;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out

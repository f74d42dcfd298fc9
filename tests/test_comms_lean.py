"""The control-plane modules run on the device: they may use the standard
library, numpy, paho-mqtt, pydantic and psutil, and nothing heavier."""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = (
    "edge_agent.comms.commands",
    "edge_agent.comms.dispatcher",
    "edge_agent.comms.spool",
    "edge_agent.comms.download",
    "edge_agent.comms.topics",
    "edge_agent.comms.transfer",
    "edge_agent.telemetry",
)
ALLOWED_THIRD_PARTY = {"numpy", "paho", "pydantic", "pydantic_core", "psutil", "typing_extensions", "annotated_types", "typing_inspection"}  # pydantic's own


def test_control_plane_imports_only_what_a_pi_can_afford() -> None:
    code = (
        "import sys, json; before = set(sys.modules);"
        f"[__import__(m) for m in {MODULES!r}];"
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    third_party = {m for m in loaded if m not in sys.stdlib_module_names and not m.startswith("_") and m != "edge_agent"}
    assert third_party <= ALLOWED_THIRD_PARTY, sorted(third_party - ALLOWED_THIRD_PARTY)
    for heavy in ("onnx", "onnxruntime", "torch", "tensorflow", "requests", "cryptography", "cv2"):
        assert heavy not in loaded

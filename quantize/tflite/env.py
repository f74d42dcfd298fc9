"""Where the ONNX->TFLite converter lives: its own virtual environment
(``scripts/setup_onnx2tf.sh``), found from an argument, ``$EDGE_AGENT_ONNX2TF_VENV``
or the default folder, and where prepared models are cached.

onnx2tf needs Python >= 3.12 and pins numpy, onnxruntime and OpenCV builds
that clash with the agent's, hence an environment of its own that this
package only ever runs in a subprocess (:mod:`quantize.tflite.session`).

Pure functions and constants; safe from any thread.
"""

from __future__ import annotations

import os
from pathlib import Path

from quantize.errors import QuantizeError

#: The environment variable naming the converter environment.
ENV_VAR = "EDGE_AGENT_ONNX2TF_VENV"
#: Where ``scripts/setup_onnx2tf.sh`` makes it when ``ENV_VAR`` is not set.
DEFAULT_ENV = Path("~/.cache/edge-agent/onnx2tf-venv")
#: The script that makes it, as error messages name it.
SETUP_SCRIPT = "scripts/setup_onnx2tf.sh"
#: Where callers may cache prepared models (float + calibrated flatbuffers and
#: sensitivity rankings), keyed by the sha256 of everything that went in.
DEFAULT_CACHE = Path("~/.cache/edge-agent/tflite")


def find_converter_env(env: Path | str | None = None) -> Path:
    """The converter environment: ``env``, else ``$EDGE_AGENT_ONNX2TF_VENV``,
    else ``~/.cache/edge-agent/onnx2tf-venv``.

    Raises :class:`QuantizeError` (code ``converter_env_missing``) with a
    one-line message saying how to create it when it has no python.
    """
    if env is None:
        env = os.environ.get(ENV_VAR) or DEFAULT_ENV
    path = Path(env).expanduser()
    if not (path / "bin" / "python").exists():
        raise QuantizeError(
            f"the ONNX->TFLite converter environment is missing ({path}); create it with "
            f"{SETUP_SCRIPT} (needs Python >= 3.12), or point {ENV_VAR} at one",
            code="converter_env_missing",
        )
    return path

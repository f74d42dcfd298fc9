"""What the benchmark scripts share: the checkout on sys.path, the demo
model's preprocessing, and a description of the machine for the JSON."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the checkout's packages (and testassets), even without installing
    sys.path.insert(0, str(REPO))

MODEL_NAME = "mobilenet_v2"
# The demo's ImageNet preprocessing (configs/demo.toml's bundle, scripts/demo.sh).
PREPROCESSING = {
    "resize": "crop",
    "crop_fraction": 0.875,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def pack_mobilenet(assets: dict[str, Path], out: Path, *, version: int = 1) -> Path:
    """The real MobileNetV2 packed as the demo's bundle: its preprocessing and
    the ImageNet labels (``assets`` from ``testassets.build``)."""
    from edge_agent.bundles.pack import pack

    return pack(assets["mobilenet_v2"], name=MODEL_NAME, version=version, out=out,
                preprocessing=dict(PREPROCESSING), labels=assets["imagenet_labels"], task="classify")


@contextlib.contextmanager
def keeping_artifacts(dest: Path, kept: list[Any]) -> Iterator[None]:
    """Copy every model file a quantize job evaluates into ``dest`` (the
    job's own work folder is deleted when it ends, bundles are written only
    when the gate passes), appending an ``Artifact`` for each copy to
    ``kept``, so they can be timed again afterwards. The job itself runs
    unchanged: only its call to ``evaluate`` is wrapped."""
    import quantize.pipeline as pipeline_mod
    from quantize.evaluate import Artifact

    original = pipeline_mod.evaluate

    def evaluate(artifacts: Any, samples: Any, **kwargs: Any) -> Any:
        dest.mkdir(parents=True, exist_ok=True)
        for i, art in enumerate(artifacts):
            copy = dest / f"{i}-{art.path.name}"
            shutil.copyfile(art.path, copy)
            kept.append(Artifact(art.label, copy, art.preprocessing))
        return original(artifacts, samples, **kwargs)

    pipeline_mod.evaluate = evaluate
    try:
        yield
    finally:
        pipeline_mod.evaluate = original


def emit(report: dict[str, Any], table: str, *, json_only: bool) -> None:
    """The JSON on stdout, then (unless ``json_only``) the readable table."""
    import json

    print(json.dumps(report, indent=2))
    if not json_only:
        print()
        print(table)


def cpu_model() -> str:
    from edge_agent.bench import cpu_name

    return cpu_name()


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info(**versions: str | None) -> dict[str, Any]:
    """CPU, platform, Python and library versions (``versions`` adds more)."""
    import cv2
    import numpy as np
    import onnxruntime as ort

    import edge_agent

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        **versions,
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "edge_agent": edge_agent.__version__,
        "loadavg_at_start": loadavg(),
    }

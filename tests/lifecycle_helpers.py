"""Shared helpers of the lifecycle tests: tiny real ONNX bundles, frame
folders, and an agent built from a config made in code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.agent import Agent
from edge_agent.bundles import sha256_file
from edge_agent.bundles.pack import pack
from edge_agent.config import parse_config
from edge_agent.testing import RecordingSink, tiny_onnx_classifier
from waiting import wait_until

PRE = {"size": (32, 32), "resize": "stretch", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def make_bundle(folder: Path, version: int, *, name: str = "clf", archive: bool = False, samples: list[Path] = (),
                sign_key: Path | None = None, extra_files: dict[str, Path] | None = None, **model_kw: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx_classifier(folder / f"{name}-v{version}.onnx", size=(32, 32), seed=version, **model_kw)
    out = folder / (f"{name}-v{version}.tar.gz" if archive else f"{name}-v{version}")
    return pack(model, name=name, version=version, out=out, preprocessing=dict(PRE), sample_images=list(samples),
                sign_key=sign_key, extra_files=extra_files)


def frames(folder: Path, *, bright: bool = False, n: int = 6) -> Path:
    """A folder of real PNG files: smooth gradients, or near-white frames."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if bright:
            img = np.full((48, 64, 3), 250 - i, np.uint8)
        else:
            y, x = np.mgrid[0:48, 0:64]
            img = np.stack([(x * 4 + i * 20) % 256, (y * 5) % 256, ((x + y) * 3) % 256], -1).astype(np.uint8)
        cv2.imwrite(str(folder / f"f{i:03d}.png"), img)
    return folder


def rehash(bundle: Path) -> None:
    """Recompute the manifest's sha256/size entries after a test edited a file
    on purpose (a bundle that is consistent but wrong)."""
    path = bundle / "manifest.json"
    m = json.loads(path.read_text())
    for f in m["files"]:
        f["sha256"] = sha256_file(bundle / f["path"])
        f["size"] = (bundle / f["path"]).stat().st_size
    path.write_text(json.dumps(m, indent=2))


def config(tmp: Path, bundle: Path | None, frame_dir: Path | None, *, source_fps: float = 60.0,
           sources: list[dict] | None = None, store: dict | None = None, **model_kw: Any):
    model = {"name": "clf", "threads": 1, "probation_frames": 20, "probation_s": 30.0, **model_kw}
    if bundle is not None:
        model["bundle"] = str(bundle)
    data: dict[str, Any] = {
        "device_id": "test",
        "log_level": "warning",
        "store": {"path": str(tmp / "store"), **(store or {})},
        "models": [model],
        "sources": [],
    }
    if frame_dir is not None:
        data["sources"] = sources or [{
            "name": "cam", "uri": str(frame_dir), "model": "clf", "loop": True, "realtime": True,
            "source_fps": source_fps,
        }]
    return parse_config(data)


def agent_toml(device: str, *, bundle: Path | None = None, store: dict | None = None, **model_kw: Any) -> str:
    """The config file of an agent run as a subprocess from a folder that
    holds its frames in ``frames/`` (the store goes to ``store/``): model
    ``clf`` (with ``model_kw``), one looping source ``cam``."""
    def value(v: Any) -> str:
        return json.dumps(v) if isinstance(v, str) else repr(v)

    model = {"name": "clf", **({"bundle": str(bundle)} if bundle is not None else {}), "threads": 1, **model_kw}
    lines = [f'device_id = "{device}"', 'log_level = "warning"', "[store]", 'path = "store"']
    lines += [f"{k} = {value(v)}" for k, v in (store or {}).items()]
    lines += ["[[models]]"] + [f"{k} = {value(v)}" for k, v in model.items()]
    lines += ["[[sources]]", 'name = "cam"', 'uri = "frames"', 'model = "clf"', "loop = true", "source_fps = 30"]
    return "\n".join(lines) + "\n"


class Running:
    """An Agent started in this process with a recording sink and an event list."""

    def __init__(self, cfg) -> None:
        self.sink = RecordingSink()
        self.agent = Agent(cfg, extra_sinks=[self.sink])
        self.events: list[dict] = []
        self.agent.events.append(self.events.append)
        self.agent.start()

    @property
    def models(self):
        return self.agent.models

    def results(self) -> list[dict]:
        return self.sink.results

    def wait_results(self, n: int, timeout: float = 20.0, **match: Any) -> list[dict]:
        def enough() -> list[dict] | None:
            got = [r for r in self.sink.results if all(r.get(k) == v for k, v in match.items())]
            return got if len(got) >= n else None

        return wait_until(enough, timeout, f"{n} results matching {match}")

    def wait_event(self, event: str, timeout: float = 20.0) -> dict:
        def seen() -> dict | None:
            return next((e for e in list(self.events) if e["event"] == event), None)

        return wait_until(seen, timeout, lambda: f"an {event!r} event; events: {[e['event'] for e in self.events]}")

    def errors(self) -> int:
        return sum(w.stats.errors for w in self.agent.workers)

    def stop(self) -> None:
        self.agent.shutdown()


def read_state(tmp: Path, name: str = "clf") -> dict:
    return json.loads((tmp / "store" / name / "state.json").read_text())

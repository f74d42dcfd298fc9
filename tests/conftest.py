"""Shared fixtures: the real models and photos, bundles, and a real broker.

* ``assets``: the cached real assets (MobileNetV2 ONNX, BlazeFace TFLite, real
  photos, the demo video) built by :mod:`testassets`; tests that
  need them are skipped, with the reason, only where a build tool is missing.
* ``mobilenet_bundle`` / ``blazeface_bundle``: those models packed as the
  agent would receive them.
* ``broker``: a mosquitto started for this test session on a free loopback
  port, with a config file of our own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import testassets
from mqtt_helpers import Mosquitto

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


CORE_ASSETS = {"mobilenet_v2", "imagenet_labels", "blazeface", "photos", "demo_video"}


@pytest.fixture(scope="session")
def assets() -> dict[str, Path]:
    try:
        return testassets.build(testassets.default_cache_dir(), only=CORE_ASSETS)
    except testassets.AssetError as exc:
        pytest.skip(f"real assets unavailable: {exc} (scripts/test.sh installs what they need)")
    except ImportError as exc:
        pytest.skip(f"a build tool for the real assets is missing: {exc} (run scripts/setup.sh dev)")


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Fashion-MNIST CNN (trained once, cached) and its real test images."""
    try:
        return testassets.build(testassets.default_cache_dir(), only={"fashion_mnist"})["fashion_mnist"]
    except testassets.AssetError as exc:
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")


@pytest.fixture(scope="session")
def mobilenet_bundle(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_agent.bundles.pack import pack

    out = tmp_path_factory.mktemp("bundles") / "mobilenet_v2"
    return pack(
        assets["mobilenet_v2"],
        name="mobilenet_v2",
        version=1,
        out=out,
        preprocessing={
            "resize": "crop",
            "crop_fraction": 0.875,
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "layout": "nchw",
            "color": "rgb",
        },
        labels=assets["imagenet_labels"],
    )


@pytest.fixture(scope="session")
def blazeface_bundle(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_agent.bundles.pack import pack

    labels = tmp_path_factory.mktemp("labels") / "face.txt"
    labels.write_text("face\n")
    return pack(
        assets["blazeface"],
        name="blazeface",
        version=1,
        out=tmp_path_factory.mktemp("bundles") / "blazeface",
        preprocessing={"resize": "letterbox", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
        labels=labels,
        task="detect",
    )


def _loaded(bundle_path: Path, name: str):
    from edge_agent.bundles import open_bundle
    from edge_agent.config import ModelConfig
    from edge_agent.models.servable import LoadedModel

    with open_bundle(bundle_path) as bundle:
        return LoadedModel.load(bundle, ModelConfig(name=name, threads=2))


@pytest.fixture(scope="session")
def mobilenet(mobilenet_bundle: Path):
    """The real MobileNetV2, loaded (ONNX Runtime) as the agent serves it."""
    model = _loaded(mobilenet_bundle, "mobilenet_v2")
    yield model
    model.runtime.close()


@pytest.fixture(scope="session")
def blazeface(blazeface_bundle: Path):
    """The real BlazeFace, loaded (LiteRT) as the agent serves it."""
    model = _loaded(blazeface_bundle, "blazeface")
    yield model
    model.runtime.close()


@dataclass
class Broker:
    host: str
    port: int


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One mosquitto for the test session (``host``, ``port``)."""
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed (scripts/test.sh installs it with apt)")
    try:
        made = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    except RuntimeError as exc:
        pytest.fail(f"mosquitto did not start: {exc}")
    yield made
    made.stop()


# Fixtures that bring the real models, photos, the TFLite converter's
# TensorFlow (its environment in the asset cache) or a broker: a test using
# any of them (directly or through another fixture) is an integration test.
REAL_FIXTURES = {"assets", "broker", "flood_broker", "mobilenet_bundle", "blazeface_bundle", "mobilenet",
                 "blazeface", "fashion_mnist", "converter_env"}
# ... and so is one that starts a broker or an agent process of its own.
REAL_CALLS = ("Mosquitto(", "AgentProcess(", "agent_process(", "start_broker(")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``integration`` every test that needs a real model or a broker,
    so that ``pytest -m "not integration"`` is the quick suite."""
    import inspect

    for item in items:
        if item.get_closest_marker("integration"):
            continue
        uses = REAL_FIXTURES & set(getattr(item, "fixturenames", ()))
        if not uses:
            try:
                source = inspect.getsource(item.function)  # type: ignore[attr-defined]
            except (AttributeError, OSError, TypeError):
                source = ""
            uses = {call for call in REAL_CALLS if call in source}
        if uses:
            item.add_marker(pytest.mark.integration)

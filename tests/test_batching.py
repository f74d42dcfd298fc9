"""Micro-batching: frames of the sources one model serves go through one
inference; each source gets its own result, a batch waits at most
``batch_wait_ms``, and one batch is served by one acquired version."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.bundles import open_bundle
from edge_agent.bundles.pack import pack
from edge_agent.config import ModelConfig, parse_config
from edge_agent.models.lifecycle import deploy
from edge_agent.models.servable import LoadedModel
from edge_agent.pipeline.batching import Batcher
from edge_agent.sources import Frame
from edge_agent.testing import StaticModels, tiny_onnx_classifier
from lifecycle_helpers import PRE, Running, config, frames

SOURCES = 4


def dynamic_bundle(folder: Path, version: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx_classifier(folder / f"clf-v{version}.onnx", size=(32, 32), seed=version, batch="N")
    return pack(model, name="clf", version=version, out=folder / f"clf-v{version}", preprocessing=dict(PRE))


def load(bundle: Path) -> LoadedModel:
    with open_bundle(bundle) as b:
        return LoadedModel.load(b, ModelConfig(name="clf", threads=1))


PHOTOS = ("chelsea", "coffee", "astronaut", "horses")


def pictures(assets: dict[str, Path], n: int) -> list[np.ndarray]:
    """``n`` different real photos, at a camera-ish 64 x 48."""
    return [cv2.resize(cv2.imread(str(assets["photos"] / f"{name}.jpg")), (64, 48), interpolation=cv2.INTER_AREA)
            for name in PHOTOS[:n]]


def submit_all(batcher: Batcher, images: list[np.ndarray]) -> list:
    """Each image from its own thread (as each source's worker does)."""
    out: list = [None] * len(images)

    def work(i: int) -> None:
        out[i] = batcher.run(Frame(images[i], i, 0.0), None, None)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_each_source_gets_its_own_result_from_one_batch(assets: dict[str, Path], tmp_path: Path) -> None:
    model = load(dynamic_bundle(tmp_path))
    try:
        assert model.batchable
        models = StaticModels(model)
        batcher = Batcher(models, "clf", None, size=SOURCES, wait_s=5.0)
        for _ in range(SOURCES):
            batcher.attach()
        images = pictures(assets, SOURCES)
        want = [model.process(img).payload for img in images]
        assert len({str(w) for w in want}) == SOURCES  # different answers: a mix-up would show
        got = submit_all(batcher, images)
        assert [out.payload for out, _ in got] == want
        assert batcher.batches == 1 and batcher.frames == SOURCES
        assert models.acquired == 1  # one acquired version for the whole batch
        assert all(m is model for _, m in got)
    finally:
        model.close()


def test_a_lone_frame_waits_at_most_the_max_wait(assets: dict[str, Path], tmp_path: Path) -> None:
    model = load(dynamic_bundle(tmp_path))
    try:
        batcher = Batcher(StaticModels(model), "clf", None, size=SOURCES, wait_s=0.3)
        for _ in range(SOURCES):
            batcher.attach()  # four sources, only one sends a frame
        t0 = time.monotonic()
        out, _ = batcher.run(Frame(pictures(assets, 1)[0], 0, 0.0), None, None)
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 2.0, waited
        assert out.payload["top"] and batcher.batches == 1
        # With every attached source in, the batch does not wait at all.
        quick = Batcher(StaticModels(model), "clf", None, size=2, wait_s=30.0)
        quick.attach()
        quick.attach()
        t0 = time.monotonic()
        submit_all(quick, pictures(assets, 2))
        assert time.monotonic() - t0 < 10.0 and quick.batches == 1
    finally:
        model.close()


def test_a_model_without_a_dynamic_batch_goes_frame_by_frame(assets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    static = tiny_onnx_classifier(tmp_path / "s" / "clf-v1.onnx", size=(32, 32), seed=1)
    model = load(pack(static, name="clf", version=1, out=tmp_path / "s" / "clf-v1", preprocessing=dict(PRE)))
    try:
        assert not model.batchable
        batcher = Batcher(StaticModels(model), "clf", None, size=3, wait_s=5.0)
        for _ in range(3):
            batcher.attach()
        images = pictures(assets, 3)
        got = submit_all(batcher, images)
        assert [o.payload for o, _ in got] == [model.process(img).payload for img in images]
    finally:
        model.close()


def test_batched_sources_through_a_hot_swap_and_probation(tmp_path: Path) -> None:
    frame_dir = frames(tmp_path / "frames")
    v1, v2 = dynamic_bundle(tmp_path / "b", 1), dynamic_bundle(tmp_path / "b", 2)
    sources = [{"name": f"cam{i}", "uri": str(frame_dir), "model": "clf", "loop": True, "source_fps": 60.0}
               for i in range(SOURCES)]
    cfg = config(tmp_path, v1, frame_dir, sources=sources, batch_size=SOURCES, batch_wait_ms=20.0,
                 probation_frames=40)
    run = Running(cfg)
    try:
        run.wait_results(20, version=1)
        assert deploy(run.models, v2)["active"] == 2
        run.wait_event("probation_passed", timeout=30)
        got = {s for s, r, _ in run.sink.items if r["version"] == 2}
        assert got == {f"cam{i}" for i in range(SOURCES)}, got
        assert run.errors() == 0
        stats = run.agent.batching.stats()["clf"]
        assert stats["frames"] > stats["batches"]  # frames did go through together
        assert {s for s, _, _ in run.sink.items} == {f"cam{i}" for i in range(SOURCES)}
    finally:
        run.stop()


def test_batch_keys_are_validated() -> None:
    base = {"models": [{"name": "m", "batch_size": 0, "batch_wait_ms": -1}]}
    with pytest.raises(Exception) as err:
        parse_config(base)
    assert "batch_size" in str(err.value) and "batch_wait_ms" in str(err.value)


# ----------------------------------------------------------- the real model


MOBILENET_PRE = {"resize": "crop", "crop_fraction": 0.875, "mean": (0.485, 0.456, 0.406),
                 "std": (0.229, 0.224, 0.225), "layout": "nchw", "color": "rgb"}


def test_batching_leaves_the_real_models_answers_unchanged(assets: dict[str, Path], mobilenet: LoadedModel,
                                                           tmp_path: Path) -> None:
    """MobileNetV2 with a dynamic batch dimension: the top-1 of every photo
    in a batch of 4 is the one the static (batch 1) model gives it alone."""
    from testassets.mobilenet import dynamic_batch_copy

    onnx = dynamic_batch_copy(assets["mobilenet_v2"], tmp_path / "mobilenet_v2_dynamic.onnx")
    bundle = pack(onnx, name="mobilenet_v2", version=2, out=tmp_path / "bundle", preprocessing=dict(MOBILENET_PRE),
                  labels=assets["imagenet_labels"])
    with open_bundle(bundle) as b:
        dynamic = LoadedModel.load(b, ModelConfig(name="mobilenet_v2", threads=1))
    try:
        assert dynamic.batchable and not mobilenet.batchable
        names = ["chelsea", "coffee", "dog", "horses", "rocket", "astronaut", "motorcycle_left", "eagle"]
        images = [cv2.imread(str(assets["photos"] / f"{n}.jpg")) for n in names]
        alone = [mobilenet.process(img).payload["top"] for img in images]
        batched = []
        for i in range(0, len(images), SOURCES):
            outs = dynamic.process_batch([(img, None, None, None) for img in images[i : i + SOURCES]])
            batched += [o.payload["top"] for o in outs]
        assert [t[0]["index"] for t in batched] == [t[0]["index"] for t in alone]
        assert all(abs(a[0]["score"] - b[0]["score"]) < 1e-3 for a, b in zip(alone, batched))
        assert alone[0][0]["index"] in {281, 282, 285}  # chelsea is a cat
    finally:
        dynamic.close()

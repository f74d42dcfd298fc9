"""Preprocessing in the capture thread: frames carry their input tensor,
tagged with the preprocessing it was made for; a model uses it only when
the tag is its own, so a hot swap to a model with other preprocessing stays
correct."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_agent.bundles import open_bundle
from edge_agent.bundles.pack import pack
from edge_agent.config import ModelConfig
from edge_agent.models.lifecycle import deploy
from edge_agent.models.servable import LoadedModel
from edge_agent.pipeline.preprocess import Prepared
from edge_agent.testing import tiny_onnx_classifier
from lifecycle_helpers import PRE, Running, config, frames, make_bundle
from waiting import wait_until

# v2: the same kind of model with other preprocessing (BGR, no normalisation).
PRE_V2 = {"size": (32, 32), "resize": "stretch", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "color": "bgr"}


def other_bundle(folder: Path, version: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_onnx_classifier(folder / f"clf-v{version}.onnx", size=(32, 32), seed=version)
    return pack(model, name="clf", version=version, out=folder / f"clf-v{version}", preprocessing=dict(PRE_V2))


def loaded(bundle: Path) -> LoadedModel:
    with open_bundle(bundle) as b:
        return LoadedModel.load(b, ModelConfig(name="clf", threads=1))


def picture(frame_dir: Path) -> np.ndarray:
    img = cv2.imread(str(sorted(frame_dir.iterdir())[0]))
    assert img is not None
    return img


def test_a_model_uses_a_tensor_prepared_for_its_preprocessing_and_redoes_another(tmp_path: Path) -> None:
    v1, v2 = loaded(make_bundle(tmp_path / "b", 1)), loaded(other_bundle(tmp_path / "b", 2))
    try:
        img = picture(frames(tmp_path / "f", n=1))
        fresh = v2.process(img).payload
        # Made for v2 (another object with the same preprocessing): used as it is.
        ahead = v2.process(img, prepared=loaded_pre(v2).prepare(img))
        assert ahead.payload == fresh
        # Made for v1: v2 preprocesses the frame again, and answers as if nothing had been made ahead.
        stale = v1.preprocess.prepare(img)
        assert stale.key != v2.preprocess.key
        assert v2.process(img, prepared=stale).payload == fresh
        # (Using v1's tensor would have given another answer: the check can fail.)
        wrong = Prepared(v2.preprocess.key, stale.tensor, stale.transform)
        assert v2.process(img, prepared=wrong).payload != fresh
    finally:
        v1.close()
        v2.close()


def loaded_pre(model: LoadedModel):
    """A second Preprocessor with the same spec (another object, equal key)."""
    from edge_agent.pipeline.preprocess import Preprocessor

    return Preprocessor(model.manifest.preprocessing, model.manifest.inputs[0])


def test_results_stay_correct_across_a_hot_swap_to_other_preprocessing(tmp_path: Path) -> None:
    frame_dir = frames(tmp_path / "frames", n=1)  # one picture, looped: every frame is the same
    img = picture(frame_dir)
    b1, b2 = make_bundle(tmp_path / "b", 1), other_bundle(tmp_path / "b", 2)
    want = {}
    for version, bundle in ((1, b1), (2, b2)):
        m = loaded(bundle)
        want[version] = m.process(img).payload["top"]
        m.close()
    assert want[1] != want[2]
    run = Running(config(tmp_path, b1, frame_dir, probation_frames=1000))
    try:
        run.wait_results(5, version=1)
        worker = run.agent.workers[0]
        wait_until(lambda: worker.source._prepare is not None, 10, "the source preprocessing ahead")
        assert deploy(run.models, b2)["active"] == 2
        got = run.wait_results(20, version=2)
        assert all(r["top"] == want[2] for r in got), [r["top"] for r in got if r["top"] != want[2]][:2]
        assert all(r["top"] == want[1] for r in run.results() if r["version"] == 1)
        # The source now prepares frames for v2.
        with run.models.acquire("clf") as v2:
            assert worker.source._prepare.__self__ is v2.preprocess
        assert run.errors() == 0
    finally:
        run.stop()

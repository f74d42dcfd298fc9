"""Frame sources (video files, folders) and the per-source inference loop:
frames are delivered in order, a slow model makes the source skip frames
rather than queue them, and the fps cap bounds the inference rate."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_agent.config import SourceConfig
from edge_agent.errors import SourceError
from edge_agent.models.servable import LoadedModel
from edge_agent.pipeline.worker import SourceWorker
from edge_agent.sources import Frame, FolderSource, FrameSource, VideoSource, open_source
from edge_agent.testing import RecordingSink, SlowRuntime, StaticModels, slowed
from waiting import let_time_pass

SIZE = (320, 240)  # width, height of the test videos
FPS = 30
CAT_LABELS = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture(scope="module")
def pictures(assets: dict[str, Path]) -> dict[str, np.ndarray]:
    """Real photos at the test videos' size."""
    out = {}
    for name in ("chelsea", "coffee", "dog"):
        img = cv2.imread(str(assets["photos"] / f"{name}.jpg"))
        assert img is not None
        out[name] = cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA)
    return out


def write_video(path: Path, frames: list[np.ndarray], fps: float = FPS) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, SIZE)
    assert writer.isOpened(), "OpenCV cannot write MJPG .avi here"
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def which(image: np.ndarray, pictures: dict[str, np.ndarray]) -> str:
    """The name of the picture a (compressed) frame shows."""
    image = cv2.resize(image, SIZE) if image.shape[1::-1] != SIZE else image
    errors = {name: float(np.abs(image.astype(np.int16) - pic).mean()) for name, pic in pictures.items()}
    best = min(errors, key=errors.get)
    assert errors[best] < 10, errors  # JPEG noise only, never a different picture
    return best


def source_cfg(uri: Path | str, **kw) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "test"), uri=str(uri), model=kw.pop("model", "mobilenet_v2"), **kw)


def drain(source: FrameSource, limit: int = 1000, timeout: float = 5.0, pause: float = 0.0) -> list[Frame]:
    """Every frame until the source ends (started and stopped here), taking
    ``pause`` seconds over each one like a consumer with work to do."""
    frames = []
    source.start()
    try:
        while len(frames) < limit:
            frame = source.next_frame(timeout=timeout)
            if frame is None:
                assert source.finished, "timed out waiting for a frame"
                break
            frames.append(frame)
            let_time_pass(pause, "the consumer's work on the frame")
    finally:
        source.stop()
    return frames




# ------------------------------------------------------------------- sources


def test_video_file_delivers_every_frame_when_not_realtime(tmp_path: Path, pictures) -> None:
    """Batch jobs and benchmarks (realtime = false) must see every frame of a file, in order, none skipped."""
    order = ["chelsea"] * 4 + ["coffee"] * 4 + ["dog"] * 4
    video = write_video(tmp_path / "clip.avi", [pictures[n] for n in order])
    source = open_source(source_cfg(video, realtime=False))
    assert isinstance(source, VideoSource) and not source.live
    frames = drain(source, pause=0.02)  # a consumer slower than the file can be decoded
    assert [f.index for f in frames] == list(range(12))
    assert [which(f.image, pictures) for f in frames] == order
    assert frames[0].image.shape == (SIZE[1], SIZE[0], 3) and frames[0].image.dtype == np.uint8
    assert source.stats() == {"captured": 12, "skipped": 0, "errors": 0}
    assert source.finished
    assert all(a.ts <= b.ts for a, b in zip(frames, frames[1:]))


def test_folder_reads_images_in_name_order_and_skips_unreadable(tmp_path: Path, pictures) -> None:
    """A folder replays in name order; one corrupt image is counted as an error and skipped, not fatal."""
    cv2.imwrite(str(tmp_path / "03_coffee.jpg"), pictures["coffee"])
    cv2.imwrite(str(tmp_path / "01_chelsea.png"), pictures["chelsea"])
    (tmp_path / "02_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 4)
    cv2.imwrite(str(tmp_path / "10_dog.jpg"), pictures["dog"])
    (tmp_path / "notes.txt").write_text("not an image, not an error")
    source = open_source(source_cfg(tmp_path, realtime=False))
    assert isinstance(source, FolderSource)
    frames = drain(source, pause=0.02)
    assert [which(f.image, pictures) for f in frames] == ["chelsea", "coffee", "dog"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert source.stats() == {"captured": 3, "skipped": 0, "errors": 1}
    assert source.last_error is not None and "02_broken.jpg" in source.last_error


def test_folder_loop_replays(tmp_path: Path, pictures) -> None:
    """loop = true replays a folder from the start, with frame indices that keep counting."""
    cv2.imwrite(str(tmp_path / "a.jpg"), pictures["chelsea"])
    cv2.imwrite(str(tmp_path / "b.jpg"), pictures["coffee"])
    source = open_source(source_cfg(tmp_path, realtime=False, loop=True))
    frames = drain(source, limit=5)
    assert [which(f.image, pictures) for f in frames] == ["chelsea", "coffee", "chelsea", "coffee", "chelsea"]
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    assert source.finished, "stop() must end a looping source's capture thread"


def test_video_loop_replays(tmp_path: Path, pictures) -> None:
    """A looping video file starts again after its last frame instead of ending the source."""
    video = write_video(tmp_path / "short.avi", [pictures["chelsea"], pictures["coffee"], pictures["dog"]])
    frames = drain(open_source(source_cfg(video, realtime=False, loop=True)), limit=7)
    assert [which(f.image, pictures) for f in frames] == ["chelsea", "coffee", "dog"] * 2 + ["chelsea"]


def test_missing_file_raises_source_error(tmp_path: Path) -> None:
    """A source pointing at nothing must be reported when the agent starts, naming the URI."""
    missing = tmp_path / "nope.avi"
    with pytest.raises(SourceError, match="nope.avi"):
        open_source(source_cfg(missing))


def test_unreadable_video_ends_the_source_with_an_error(tmp_path: Path) -> None:
    """A file OpenCV cannot open ends that source with an error counted, instead of hanging or crashing the agent."""
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"RIFF....AVI not really" * 10)
    source = open_source(source_cfg(bad, realtime=False))
    assert drain(source) == []
    assert source.finished and source.stats()["errors"] == 1
    assert "cannot open" in (source.last_error or "")


def test_empty_folder_is_an_error(tmp_path: Path) -> None:
    """A folder with no images is a mistake worth reporting, not an empty success."""
    source = open_source(source_cfg(tmp_path, realtime=False))
    assert drain(source) == []
    assert source.stats()["errors"] == 1 and "holds no images" in (source.last_error or "")


# ------------------------------------------------------------------ pipeline


def watch_takes(source: FrameSource, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, float]]:
    """Record (taken frame index, frames captured so far, monotonic time) at the instant each
    frame is taken, under the source's own lock so no capture can slip in between."""
    taken: list[tuple[int, int, float]] = []
    original = source.next_frame

    def next_frame(timeout: float | None = None) -> Frame | None:
        with source._cond:
            frame = original(timeout)
            if frame is not None:
                taken.append((frame.index, source.captured, time.monotonic()))
        return frame

    monkeypatch.setattr(source, "next_frame", next_frame)
    return taken


def run_worker(source: FrameSource, models, timeout: float = 10.0) -> tuple[SourceWorker, RecordingSink]:
    sink = RecordingSink()
    stop = threading.Event()
    worker = SourceWorker(source, models, [sink], stop)
    source.start()
    worker.start()
    worker.join(timeout)
    stop.set()
    source.stop()
    assert worker.done, "the worker must end when its file source ends"
    return worker, sink


def test_slow_model_skips_frames_and_always_takes_the_newest(
    tmp_path: Path, pictures, mobilenet: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model slower than the camera must see the newest frame each time, with the rest counted as skipped, never queued (latency stays bounded)."""
    order = ["chelsea"] * 10 + ["coffee"] * 10 + ["dog"] * 10
    video = write_video(tmp_path / "clip.avi", [pictures[n] for n in order])  # 1 s at 30 fps
    source = open_source(source_cfg(video, realtime=True))
    taken = watch_takes(source, monkeypatch)
    slow = slowed(mobilenet, 0.1)  # ~10 inferences a second against 30 frames a second
    worker, sink = run_worker(source, StaticModels(slow))

    stats = source.stats()
    results = sink.results
    indices = [r["frame"] for r in results]
    assert stats["captured"] == 30 and stats["errors"] == 0
    assert worker.stats.frames == len(results) == len(taken)
    assert worker.stats.frames + stats["skipped"] == stats["captured"], "every frame is either inferred or skipped"
    assert stats["skipped"] >= 10, stats
    assert 4 <= len(results) <= 20, indices
    assert indices == sorted(set(indices)) and max(np.diff(indices)) >= 2, indices
    # each frame taken was the newest one captured at that instant
    assert all(index == captured - 1 for index, captured, _ in taken), taken
    assert indices[-1] == 29, "the last frame of the file is never lost"
    assert isinstance(slow.runtime, SlowRuntime) and slow.runtime.calls == len(results)
    # and the results are real: each says what its frame shows
    for r in results:
        expected = order[r["frame"]]
        top1 = r["top"][0]["label"]
        if expected == "chelsea":
            assert top1 in CAT_LABELS, r
        elif expected == "coffee":
            assert top1 == "espresso", r
        else:
            assert top1 in {"malamute", "Eskimo dog", "Siberian husky"}, r
    assert {"ts", "seq", "frame", "model", "version", "latency_ms", "top"} <= set(results[0])
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    assert all(r["latency_ms"] >= 100 for r in results), "the latency includes the slow inference"


def test_fps_cap_limits_the_inference_rate(
    tmp_path: Path, pictures, mobilenet: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fps = 5 on a 30 fps source must run about 5 inferences a second, skipping the rest (CPU is the Pi's scarcest resource)."""
    video = write_video(tmp_path / "clip.avi", [pictures["chelsea"]] * 30)  # 1 s at 30 fps
    source = open_source(source_cfg(video, realtime=True, fps=5))
    taken = watch_takes(source, monkeypatch)
    started = time.monotonic()
    worker, sink = run_worker(source, StaticModels(mobilenet))
    elapsed = time.monotonic() - started
    stats = source.stats()
    assert stats["captured"] == 30
    assert worker.stats.frames + stats["skipped"] == 30 == len(sink.results) + stats["skipped"]
    # about 1 s of video at 5/s, plus the last frame of the file
    assert 4 <= len(taken) <= 7, (len(taken), elapsed)
    # the k-th frame is taken no earlier than k/5 s after the worker started: over any
    # stretch from the start the rate never runs ahead of the cap
    times = np.array([t for _, _, t in taken]) - started
    ahead = np.arange(len(times)) * 0.2 - times
    assert ahead.max() <= 0.01, times


def test_worker_counts_failures_and_keeps_going(tmp_path: Path, pictures, mobilenet: LoadedModel) -> None:
    """A frame that fails (here: the model is not loaded) is counted as an error and the loop continues to the end of the source."""
    cv2.imwrite(str(tmp_path / "a.jpg"), pictures["chelsea"])
    cv2.imwrite(str(tmp_path / "b.jpg"), pictures["coffee"])
    source = open_source(source_cfg(tmp_path, realtime=False, model="absent"))
    worker, sink = run_worker(source, StaticModels(mobilenet))
    assert sink.results == []
    assert worker.stats.errors == 2 and worker.stats.frames == 0


def test_not_realtime_slow_model_infers_every_frame(tmp_path: Path, pictures, mobilenet: LoadedModel) -> None:
    """With realtime = false (batch jobs, benchmarks) a slow model must get every frame of the file, none skipped."""
    order = ["chelsea", "coffee", "dog"] * 2
    video = write_video(tmp_path / "clip.avi", [pictures[n] for n in order])
    source = open_source(source_cfg(video, realtime=False))
    worker, sink = run_worker(source, StaticModels(slowed(mobilenet, 0.05)))
    assert [r["frame"] for r in sink.results] == list(range(6))
    assert source.stats() == {"captured": 6, "skipped": 0, "errors": 0}
    assert worker.stats.frames == 6

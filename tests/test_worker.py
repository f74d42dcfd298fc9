"""The worker's stages and settings, with a stand-in source and model (no
camera, no runtime): the result envelope, the result throttle and how the
settings other threads change reach a frame."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import types
from typing import Any, Iterator

import numpy as np
import pytest

from edge_agent.pipeline.stages import Settings
from edge_agent.pipeline.worker import SourceWorker
from edge_agent.sources import Frame
from edge_agent.testing import RecordingSink


class _Source:
    """``n`` frames ready at once, then the end."""

    name = "cam"

    def __init__(self, n: int) -> None:
        self.cfg = types.SimpleNamespace(name="cam", model="m", label=None, fps=None, threshold=0.25, top_k=3)
        self.n, self.i, self.finished = n, 0, False

    def want_after(self, t: float | None) -> None:
        pass

    def next_frame(self, timeout: float | None = None) -> Frame | None:
        if self.i >= self.n:
            self.finished = True
            return None
        self.i += 1
        return Frame(np.zeros((2, 2, 3), np.uint8), self.i - 1, 1000.0 + self.i)


class _Models:
    """A model that reports the settings it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def acquire(self, name: str, label: str | None = None) -> Iterator[Any]:
        def process(image: Any, *, top_k: Any = None, threshold: Any = None, prepared: Any = None) -> Any:
            self.calls.append((top_k, threshold))
            return types.SimpleNamespace(latency_ms=1.23456, payload={"top": []})

        yield types.SimpleNamespace(name=name, version=7, process=process)


def test_the_stages_build_the_result_envelope_and_throttle_results() -> None:
    """One result in `results_every`, numbered by inferred frame, with the envelope of CONTRACT §3 in its order."""
    sink, models = RecordingSink(), _Models()
    worker = SourceWorker(_Source(6), models, [sink], threading.Event())  # type: ignore[arg-type]
    worker.results_every = 2
    worker.start()
    worker.join(5)
    assert worker.done and worker.finished_cleanly and worker.blocked_in is None
    assert worker.stats.frames == 6 and models.calls == [(3, 0.25)] * 6
    assert [r["seq"] for r in sink.results] == [2, 4, 6]
    assert [r["frame"] for r in sink.results] == [1, 3, 5]
    assert list(sink.results[0]) == ["ts", "seq", "frame", "model", "version", "latency_ms", "top"]
    assert sink.results[0]["model"] == "m" and sink.results[0]["version"] == 7
    assert sink.results[0]["latency_ms"] == 1.235 and sink.results[0]["ts"] == 1002.0


def test_settings_change_whole_and_together() -> None:
    """The `set` command and a reload replace one immutable snapshot: several changes land at once, none is lost."""
    worker = SourceWorker(_Source(0), _Models(), [], threading.Event())  # type: ignore[arg-type]
    before = worker.settings
    after = worker.update(fps=5.0, threshold=0.5, results_every=3)
    assert worker.settings is after and (after.fps, after.threshold, after.results_every) == (5.0, 0.5, 3)
    assert before.fps is None and before.threshold == 0.25  # the old snapshot is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.fps = 1.0  # type: ignore[misc]
    worker.top_k = 9
    assert worker.settings.top_k == 9 and worker.fps == 5.0
    worker.apply_config(types.SimpleNamespace(model="m", label=None, fps=2.0, threshold=0.1, top_k=1))
    assert worker.settings == Settings(model="m", label=None, fps=2.0, threshold=0.1, top_k=1, results_every=3)

    def bump(field: str) -> None:
        for _ in range(2000):
            worker.update(**{field: getattr(worker.settings, field) + 1})

    worker.update(top_k=0, results_every=0)
    threads = [threading.Thread(target=bump, args=(f,)) for f in ("top_k", "results_every")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (worker.top_k, worker.results_every) == (2000, 2000)

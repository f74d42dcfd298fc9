"""Inputs that go away while the agent runs: a looping folder or video file
that disappears for a while (an unmounted USB stick or NAS, an rsync that
replaces it) is waited for with back-off, as a camera is; only an input that
cannot be read at start is a configuration error."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from edge_agent.config import SourceConfig
from edge_agent.sources import open_source
from waiting import let_time_pass


def _drain_until(source, predicate, timeout: float) -> int:
    """Take frames until ``predicate()``; returns how many were taken."""
    taken = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        if source.next_frame(timeout=0.05) is not None:
            taken += 1
    return taken


def _photos(folder: Path, assets: dict[str, Path], n: int = 3) -> Path:
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut")[:n]:
        shutil.copy(assets["photos"] / f"{name}.jpg", folder / f"{name}.jpg")
    return folder


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_a_looping_input_that_goes_away_is_waited_for_not_fatal(tmp_path: Path, assets, kind: str) -> None:
    if kind == "folder":
        target = _photos(tmp_path / "frames", assets)
    else:
        target = tmp_path / "cam.avi"
        shutil.copy(assets["demo_video"], target)
    aside = tmp_path / "aside"
    source = open_source(SourceConfig(name="usb", uri=str(target), model="m", loop=True, source_fps=200))
    source.start()
    try:
        assert _drain_until(source, lambda: source.captured >= 5, 10) >= 1
        target.rename(aside)  # unmounted
        assert _drain_until(source, lambda: source.state == "retrying", 30) >= 0
        assert source.state == "retrying" and not source.finished and not source.failed
        let_time_pass(1.0, "a source that gave up would have finished by now")
        assert not source.finished
        before = source.captured
        aside.rename(target)  # mounted again
        _drain_until(source, lambda: source.captured >= before + 5, 30)
        assert source.captured >= before + 5, "frames did not resume"
        assert source.state == "open" and not source.failed
        assert source.last_error and ("cannot list" in source.last_error or "cannot open" in source.last_error)
    finally:
        source.stop()


def test_an_input_missing_at_start_or_without_loop_still_ends(tmp_path: Path, assets) -> None:
    """Without loop a file source ends when its input does; a folder that is
    empty at start is reported as failed (a config problem) at once."""
    empty = tmp_path / "empty"
    empty.mkdir()
    source = open_source(SourceConfig(name="empty", uri=str(empty), model="m", loop=True))
    source.start()
    try:
        _drain_until(source, lambda: source.finished, 10)
        assert source.failed and source.state == "failed"
    finally:
        source.stop()


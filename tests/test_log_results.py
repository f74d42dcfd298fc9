"""`log_results`: the per-result log line is opt-in, per source, and a
reload switches it on the running worker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge_agent.config import parse_config
from edge_agent.pipeline.sinks import LogSink
from lifecycle_helpers import Running, config, frames, make_bundle
from waiting import wait_until

RESULT = {"frame": 3, "model": "clf", "version": 1, "latency_ms": 1.5, "top": [{"label": "cat", "score": 0.9}]}


def test_log_sink_writes_only_for_the_sources_it_is_enabled_for(caplog: pytest.LogCaptureFixture) -> None:
    sink = LogSink(enabled=lambda name: name == "front")
    with caplog.at_level(logging.INFO, logger="edge_agent.results"):
        sink.emit("front", RESULT)
        sink.emit("back", RESULT)
    assert [r.getMessage() for r in caplog.records] == ["front frame 3: clf v1 1.5 ms: cat 0.90"]


def test_log_results_is_off_by_default() -> None:
    cfg = parse_config({"models": [{"name": "m"}], "sources": [{"name": "a", "uri": "0", "model": "m"}]})
    assert cfg.sources[0].log_results is False


def _sources(frame_dir: Path, logged: set[str]) -> list[dict]:
    return [
        {"name": n, "uri": str(frame_dir), "model": "clf", "loop": True, "source_fps": 60.0, "log_results": n in logged}
        for n in ("quiet", "loud")
    ]


def test_only_sources_with_log_results_write_a_line_and_a_reload_switches_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(tmp_path / "b", 1)
    frame_dir = frames(tmp_path / "frames")
    cfg = config(tmp_path, bundle, frame_dir, sources=_sources(frame_dir, {"loud"}))
    caplog.set_level(logging.INFO, logger="edge_agent.results")
    run = Running(cfg)
    try:
        wait_until(lambda: {r.getMessage().split()[0] for r in caplog.records if r.name == "edge_agent.results"}
                   == {"loud"} and len({s for s, _, _ in run.sink.items}) == 2, 20, "results of both, lines of loud")
        quiet_worker = next(w for w in run.agent.workers if w.source.name == "quiet")
        # Turn it around: a live change (same workers), the lines follow.
        changes = run.agent.reload(config(tmp_path, bundle, frame_dir, sources=_sources(frame_dir, {"quiet"})))
        assert changes == ["source quiet: log_results True", "source loud: log_results False"]
        assert quiet_worker in run.agent.workers
        caplog.clear()
        wait_until(lambda: sum(r.getMessage().startswith("quiet ") for r in caplog.records) >= 3, 20, "quiet's lines")
        assert not [r for r in caplog.records if r.getMessage().startswith("loud ")][1:], "loud still logs"
    finally:
        run.stop()


def test_an_offline_agent_that_logs_no_result_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_bundle(tmp_path / "b", 1)
    frame_dir = frames(tmp_path / "frames")
    with caplog.at_level(logging.WARNING, logger="edge_agent.agent"):
        run = Running(config(tmp_path, bundle, frame_dir))
        run.stop()
    assert "no source has log_results = true" in caplog.text

"""The wall clock jumps: a Pi without a real-time clock boots in the past
and NTP moves it forward by months; an operator sets the date by hand. What
measures time spans must not notice: telemetry's ``seq`` and ``uptime_s``,
probation windows, pacing. (What must use the wall clock, a signed command's
``ts`` against ``max_age_s``, is covered with the replay journal in
test_journal.py.)

The jump is made by replacing ``time.time`` in this process: changing the
machine's clock would disturb everything else running on it, and
libfaketime 0.9.10 breaks ``time.sleep`` when it leaves the monotonic clock
alone."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_agent.bundles import sha256_file
from edge_agent.models.lifecycle import deploy, file_url
from edge_agent.telemetry import TelemetryCollector
from lifecycle_helpers import Running, config, frames, make_bundle
from waiting import let_time_pass

DAY = 86400.0


class WallClock:
    """``time.time`` shifted by ``offset`` seconds, changeable at any moment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)


def test_telemetry_seq_and_uptime_ignore_wall_clock_jumps(tmp_path: Path, monkeypatch) -> None:
    clock = WallClock(monkeypatch)
    telemetry = TelemetryCollector(disk_path=tmp_path, clock=time.time)
    first = telemetry.collect()
    clock.offset = -30 * DAY  # NTP has not run yet... then it has, the other way
    second = telemetry.collect()
    clock.offset = 365 * DAY
    let_time_pass(0.2, "the monotonic clock moves on while the wall clock jumps")
    third = telemetry.collect()
    assert [m["seq"] for m in (first, second, third)] == [1, 2, 3]
    assert 0 <= first["uptime_s"] <= second["uptime_s"] <= third["uptime_s"] < first["uptime_s"] + 60
    assert third["ts"] - first["ts"] > 364 * DAY  # ts is wall-clock time, as the CONTRACT says


@pytest.mark.parametrize("jump", [-DAY, DAY])
def test_a_probation_window_runs_its_seconds_whatever_the_wall_clock_does(tmp_path: Path, monkeypatch,
                                                                          jump: float) -> None:
    """A version on probation for 1.5 s passes after 1.5 s: not at once when
    the clock leaps a day ahead, not never when it falls a day behind."""
    clock = WallClock(monkeypatch)
    v1 = make_bundle(tmp_path / "b", 1)
    v2 = make_bundle(tmp_path / "b", 2, archive=True)
    run = Running(config(tmp_path, v1, frames(tmp_path / "frames"), probation_frames=1_000_000, probation_s=1.5))
    try:
        run.wait_results(5, version=1)
        started = time.monotonic()
        deploy(run.models, file_url(v2), sha256=sha256_file(v2), size=v2.stat().st_size)
        clock.offset = jump
        passed = run.wait_event("probation_passed", timeout=15)
        took = time.monotonic() - started
        assert passed["version"] == 2
        assert 1.4 <= took <= 10, took
        run.wait_results(5, version=2)
        assert run.errors() == 0
    finally:
        run.stop()

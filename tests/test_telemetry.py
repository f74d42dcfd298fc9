"""Telemetry: the CONTRACT message, numbers a console can trust, and no
crash when a device lacks a sensor."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from edge_agent.telemetry import SourceCounters, SourceInterval, TelemetryCollector, percentiles, read_temperature

CONTRACT_KEYS = {"ts", "seq", "uptime_s", "cpu_percent", "mem_percent", "rss_mb", "temp_c", "disk_free_mb", "sources", "models"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_message_has_the_contract_fields(tmp_path: Path) -> None:
    collector = TelemetryCollector(disk_path=tmp_path, models=lambda: {"m": {"active": 1}})
    message = collector.collect()
    assert CONTRACT_KEYS <= set(message)
    assert message["seq"] == 1
    assert 0 <= message["cpu_percent"] <= 100 * 64
    assert 0 < message["mem_percent"] < 100
    assert message["rss_mb"] > 1
    assert message["disk_free_mb"] > 0
    assert message["uptime_s"] >= 0
    assert message["models"] == {"m": {"active": 1}}
    assert message["temp_c"] is None or -40 < message["temp_c"] < 150
    json.dumps(message)


def test_seq_increases_by_one_per_message(tmp_path: Path) -> None:
    """The console detects lost messages (and restarts) from gaps in seq."""
    collector = TelemetryCollector(disk_path=tmp_path)
    assert [collector.collect()["seq"] for _ in range(5)] == [1, 2, 3, 4, 5]


def test_source_stats_over_the_interval(tmp_path: Path) -> None:
    clock = Clock()
    intervals = [
        {"front": SourceInterval(frames=50, skipped=3, errors=1, latencies_ms=[float(i) for i in range(1, 101)])},
        {"front": SourceInterval(frames=10), "door": SourceInterval()},
    ]
    collector = TelemetryCollector(disk_path=tmp_path, sources=lambda: intervals.pop(0), monotonic=clock)
    clock.now += 10
    front = collector.collect()["sources"]["front"]
    assert front["fps"] == 5.0
    assert (front["frames"], front["skipped"], front["errors"]) == (50, 3, 1)
    assert front["latency_ms"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    clock.now += 5
    message = collector.collect()["sources"]
    assert message["front"]["fps"] == 2.0
    assert (message["front"]["frames"], message["front"]["frames_total"]) == (10, 60)
    assert message["front"]["errors_total"] == 1
    assert message["door"]["latency_ms"] == {"p50": None, "p95": None, "p99": None}


def test_failing_callables_do_not_stop_telemetry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict:
        raise RuntimeError("pipeline gone")

    collector = TelemetryCollector(disk_path=tmp_path / "missing", sources=broken, models=broken)
    first = collector.collect()
    second = collector.collect()
    assert first["sources"] == {} and first["models"] == {}
    assert first["disk_free_mb"] is None
    assert second["seq"] == 2
    assert caplog.text.count("cannot read sources") == 1, "a failing probe is logged once, not every interval"


def test_temperature_from_thermal_zones(tmp_path: Path) -> None:
    """Raspberry Pi OS exposes the SoC only as /sys/class/thermal/thermal_zone0/temp (millidegrees)."""
    for i, value in enumerate(["45123\n", "51800\n", "garbage\n", "-273000\n"]):
        (tmp_path / f"thermal_zone{i}").mkdir()
        (tmp_path / f"thermal_zone{i}" / "temp").write_text(value)
    assert read_temperature(tmp_path, use_psutil=False) == 51.8
    collector = TelemetryCollector(disk_path=tmp_path, thermal_root=tmp_path, use_psutil_sensors=False)
    assert collector.collect()["temp_c"] == 51.8


def test_no_sensor_is_null(tmp_path: Path) -> None:
    assert read_temperature(tmp_path, use_psutil=False) is None
    collector = TelemetryCollector(disk_path=tmp_path, thermal_root=tmp_path, use_psutil_sensors=False)
    assert collector.collect()["temp_c"] is None


def test_percentiles() -> None:
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([7.0]) == {"p50": 7.0, "p95": 7.0, "p99": 7.0}


def test_source_counters_drain_and_bound() -> None:
    counters = SourceCounters(max_samples=100)

    def work() -> None:
        for i in range(1000):
            counters.frame(float(i % 10))
        counters.skipped(2)
        counters.error()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    interval = counters.drain()
    assert (interval.frames, interval.skipped, interval.errors) == (4000, 8, 4)
    assert len(interval.latencies_ms) == 100
    assert set(interval.latencies_ms) <= {float(i) for i in range(10)}
    assert counters.drain() == SourceInterval(0, 0, 0, ())


def test_collector_with_counters(tmp_path: Path) -> None:
    counters = {"front": SourceCounters()}
    collector = TelemetryCollector(disk_path=tmp_path, sources=lambda: {n: c.drain() for n, c in counters.items()})
    counters["front"].frame(12.5)
    stats = collector.collect()["sources"]["front"]
    assert stats["frames"] == 1 and stats["latency_ms"]["p50"] == 12.5
    assert collector.collect()["sources"]["front"]["frames"] == 0

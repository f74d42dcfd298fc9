"""Telemetry: the periodic health message of CONTRACT §3 (``P/D/telemetry``).

:class:`TelemetryCollector` builds one message per call to
:meth:`~TelemetryCollector.collect`; the caller publishes it every
``mqtt.telemetry_interval_s``. It never raises for a failed probe: a sensor
that cannot be read reports ``null`` (and is logged once), because a
telemetry loop that dies on a missing thermal zone is worse than a gap.

Per-source numbers come from the pipeline through a callable returning one
:class:`SourceInterval` per source: what happened *since the previous call*
(the pipeline hands over and resets its counters; :class:`SourceCounters`
does that bookkeeping thread-safely). From it the collector reports, per
source, ``fps`` (frames inferred per second over the interval), ``frames``,
``skipped`` and ``errors`` (counts in the interval), the same three as
running totals (``frames_total``, ``skipped_total``, ``errors_total``, an
extension: a console that misses a message loses nothing) and
``latency_ms`` percentiles of the interval (``null`` when no frame was
inferred), and for a detector source with zones, ``zones``: per zone and
label, ``count`` (objects in it now) and ``entered`` (a running total,
with ``track = true``).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import psutil

log = logging.getLogger(__name__)

MAX_LATENCY_SAMPLES = 2048
"""Latency samples kept per source and interval (a uniform reservoir beyond)."""

# Sensors that measure the SoC/CPU, preferred over e.g. a battery or a disk.
_CPU_SENSORS = ("cpu_thermal", "soc_thermal", "coretemp", "k10temp", "cpu-thermal", "zenpower", "acpitz")


@dataclass(frozen=True)
class SourceInterval:
    """What one source did since the previous telemetry message."""

    frames: int = 0
    skipped: int = 0
    errors: int = 0
    latencies_ms: Sequence[float] = ()
    zones: Mapping[str, Any] | None = None  # {zone: {label: {"count", "entered"}}}, for a source with zones


class SourceCounters:
    """Counters a source's pipeline updates per frame and telemetry drains.

    Thread-safety: every method may be called from any thread. Memory is
    bounded: beyond :data:`MAX_LATENCY_SAMPLES` frames in one interval the
    latency samples are a uniform random sample (reservoir sampling), which
    keeps the percentiles honest at any frame rate.
    """

    def __init__(self, max_samples: int = MAX_LATENCY_SAMPLES) -> None:
        self._lock = threading.Lock()
        self._max = max_samples
        self._rng = random.Random()
        self.frames = 0
        """Frames inferred since the start (running total; :meth:`drain` keeps it)."""
        self.errors = 0
        """Frames that failed since the start."""
        self._reset()

    def _reset(self) -> None:
        self._frames = 0
        self._skipped = 0
        self._errors = 0
        self._samples: list[float] = []

    def frame(self, latency_ms: float) -> None:
        """One frame inferred in ``latency_ms``."""
        with self._lock:
            self.frames += 1
            self._frames += 1
            if len(self._samples) < self._max:
                self._samples.append(latency_ms)
            else:
                slot = self._rng.randrange(self._frames)
                if slot < self._max:
                    self._samples[slot] = latency_ms

    def skipped(self, count: int = 1) -> None:
        """Frames dropped by the fps cap or a busy model."""
        with self._lock:
            self._skipped += count

    def error(self, count: int = 1) -> int:
        """Frames that failed (inference or decoding); returns the running total."""
        with self._lock:
            self.errors += count
            self._errors += count
            return self.errors

    def drain(self) -> SourceInterval:
        """The interval so far, and start a new one."""
        with self._lock:
            out = SourceInterval(self._frames, self._skipped, self._errors, tuple(self._samples))
            self._reset()
        return out


@dataclass
class _Totals:
    frames: int = 0
    skipped: int = 0
    errors: int = 0


@dataclass
class _Probe:
    """Logs a failing probe once, not every interval."""

    name: str
    failed: bool = field(default=False)

    def run(self, fn: Callable[[], Any], default: Any) -> Any:
        try:
            value = fn()
        except Exception as exc:
            if not self.failed:
                log.warning("telemetry: cannot read %s: %s (reported as %r until it recovers)", self.name, exc, default)
                self.failed = True
            return default
        if self.failed:
            log.info("telemetry: %s can be read again", self.name)
            self.failed = False
        return value


def percentiles(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation), rounded to µs; nulls for no samples."""
    if not samples:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(np.asarray(samples, dtype=np.float64), [50, 95, 99])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "p99": round(float(p99), 3)}


def read_temperature(thermal_root: Path = Path("/sys/class/thermal"), *, use_psutil: bool = True) -> float | None:
    """The SoC/CPU temperature in °C, or ``None`` where the device has none.

    psutil's sensors first (they name the sensor, so the CPU's can be
    preferred); then the kernel's thermal zones, the only source on many
    ARM boards; the hottest plausible reading wins when nothing is named.
    """
    if use_psutil and hasattr(psutil, "sensors_temperatures"):
        try:
            sensors = psutil.sensors_temperatures()
        except (OSError, RuntimeError):
            sensors = {}
        for name in _CPU_SENSORS:
            values = [t.current for t in sensors.get(name, []) if _plausible(t.current)]
            if values:
                return round(max(values), 1)
        values = [t.current for entries in sensors.values() for t in entries if _plausible(t.current)]
        if values:
            return round(max(values), 1)
    readings = []
    for zone in sorted(thermal_root.glob("thermal_zone*")):
        try:
            value = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
        if _plausible(value):
            readings.append(value)
    return round(max(readings), 1) if readings else None


def _plausible(value: float | None) -> bool:
    return value is not None and -40.0 < value < 150.0


class TelemetryCollector:
    """Builds the telemetry messages of one agent process.

    ``seq`` starts at 1 and increases by one per message for the life of
    this object (create one per process, not per connection, so it keeps
    counting across reconnects). ``sources()`` returns each source's
    :class:`SourceInterval` since the previous call; ``models()`` returns the
    ``models`` object as is.

    Thread-safety: :meth:`collect` may be called from any thread; calls are
    serialised.
    """

    def __init__(
        self,
        *,
        disk_path: Path | str,
        sources: Callable[[], Mapping[str, SourceInterval]] = dict,
        models: Callable[[], Mapping[str, Any]] = dict,
        thermal_root: Path = Path("/sys/class/thermal"),
        use_psutil_sensors: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disk_path = Path(disk_path)
        self._sources = sources
        self._models = models
        self._thermal_root = thermal_root
        self._use_psutil_sensors = use_psutil_sensors
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._seq = 0
        self._totals: dict[str, _Totals] = {}
        self._last = monotonic()
        self._process = psutil.Process(os.getpid())
        # The process's start on the monotonic clock (its age read once from
        # the wall clock), so uptime_s stays right when the wall clock jumps
        # (NTP at boot on a Pi without an RTC, a hand-set date).
        self._started = monotonic() - max(0.0, clock() - self._process.create_time())
        self._probes = {name: _Probe(name) for name in ("cpu", "memory", "rss", "temperature", "disk", "sources", "models")}
        # cpu_percent() measures since the previous call: prime it so the
        # first message reports the first interval, not 0.0.
        self._probes["cpu"].run(lambda: psutil.cpu_percent(interval=None), None)

    def collect(self) -> dict[str, Any]:
        """One telemetry message (a JSON-able dict); never raises."""
        with self._lock:
            now = self._monotonic()
            elapsed = max(now - self._last, 1e-6)
            self._last = now
            self._seq += 1
            p = self._probes
            return {
                "ts": self._clock(),
                "seq": self._seq,
                "uptime_s": round(max(0.0, now - self._started), 1),
                "cpu_percent": p["cpu"].run(lambda: round(psutil.cpu_percent(interval=None), 1), None),
                "mem_percent": p["memory"].run(lambda: round(psutil.virtual_memory().percent, 1), None),
                "rss_mb": p["rss"].run(lambda: round(self._process.memory_info().rss / 2**20, 1), None),
                "temp_c": p["temperature"].run(
                    lambda: read_temperature(self._thermal_root, use_psutil=self._use_psutil_sensors), None
                ),
                "disk_free_mb": p["disk"].run(lambda: round(shutil.disk_usage(self.disk_path).free / 2**20, 1), None),
                "sources": p["sources"].run(lambda: self._source_stats(elapsed), {}),
                "models": p["models"].run(lambda: dict(self._models()), {}),
            }

    def _source_stats(self, elapsed: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, interval in self._sources().items():
            totals = self._totals.setdefault(name, _Totals())
            totals.frames += interval.frames
            totals.skipped += interval.skipped
            totals.errors += interval.errors
            out[name] = {
                "fps": round(interval.frames / elapsed, 2),
                "frames": interval.frames,
                "skipped": interval.skipped,
                "errors": interval.errors,
                "frames_total": totals.frames,
                "skipped_total": totals.skipped,
                "errors_total": totals.errors,
                "latency_ms": percentiles(interval.latencies_ms),
            }
            if interval.zones is not None:  # an extension: sources with zones only
                out[name]["zones"] = interval.zones
        return out

"""Probation: judging a newly activated version by the frames it serves.

A version activated over another one is on probation (docs/lifecycle.md):
for ``probation_frames`` frames or ``probation_s`` seconds it must not raise
``probation_max_errors`` inference errors nor run slower than
``max_latency_factor`` times the version before it. This module holds the
judgement and the thread that asks for it; the model manager holds the
probation record (:class:`~edge_agent.models.state.Probation`, with its
in-memory :class:`~edge_agent.models.state.Watch`) and acts on a verdict
(the version becomes the last good one, or is rolled back).

* :func:`judge` is a pure function of the model's settings, the watch and
  the version's counters;
* :func:`baseline_ms` is the latency a new version is compared against;
* :class:`Supervisor` is the thread that calls the manager's check while a
  probation is watched, and sleeps while none is.

Thread-safety: :func:`judge` and :func:`baseline_ms` share nothing. The
supervisor's ``check`` runs on its own thread; the manager takes its
transaction lock there before acting on a verdict.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from edge_agent.config import ModelConfig
from edge_agent.models.state import Watch

if TYPE_CHECKING:
    from edge_agent.models.servable import LoadedModel

BASELINE_MIN_FRAMES = 10
PROBATION_MIN_FRAMES = 10  # frames before the latency of a new version is judged
# A regression must also be this large in absolute terms: sub-millisecond
# models jitter by several times their own run time on a busy CPU.
LATENCY_SLACK_MS = 1.0


@dataclass(frozen=True)
class Verdict:
    """The end of a probation: ``passed``, or failed for ``reason``; with the
    frames, errors and seconds since the watch began."""

    passed: bool
    frames: int
    errors: int
    elapsed: float
    reason: str | None = None


def baseline_ms(old: "LoadedModel | None") -> float | None:
    """The latency a new version must keep to: the median inference time of
    the version it replaces (its warm-up time when it served few frames);
    None when nothing served before (latency is then not judged)."""
    if old is None:
        return None
    _, _, times = old.stats.snapshot()
    if len(times) >= BASELINE_MIN_FRAMES:
        return statistics.median(times)
    return old.warm_ms or None


def judge(cfg: ModelConfig, watch: Watch, stats: tuple[int, int, list[float]], now: float) -> Verdict | None:
    """The verdict on a probation, or None while it goes on.

    ``stats``: the version's :meth:`ModelStats.snapshot` (frames, errors,
    recent inference times, counted since it was loaded); ``now``:
    ``time.monotonic()``. Fails on ``probation_max_errors`` errors since the
    watch began, or, once :data:`PROBATION_MIN_FRAMES` frames served and
    with a baseline, on a median inference time above ``max_latency_factor``
    times the baseline and more than :data:`LATENCY_SLACK_MS` above it.
    Passes after ``probation_frames`` frames or ``probation_s`` seconds.
    """
    frames, errors, times = stats
    frames -= watch.frames0
    errors -= watch.errors0
    elapsed = now - watch.started
    if errors >= cfg.probation_max_errors:
        return Verdict(False, frames, errors, elapsed, f"{errors} inference error(s) during probation")
    baseline = watch.baseline_ms
    if baseline and frames >= PROBATION_MIN_FRAMES:
        recent = times[-frames:] if frames <= len(times) else times
        median = statistics.median(recent)
        if median > cfg.max_latency_factor * baseline and median - baseline > LATENCY_SLACK_MS:
            reason = (
                f"latency regression: median {median:.1f} ms against {baseline:.1f} ms before "
                f"(more than {cfg.max_latency_factor:g}x)"
            )
            return Verdict(False, frames, errors, elapsed, reason)
    if frames >= cfg.probation_frames or elapsed >= cfg.probation_s:
        return Verdict(True, frames, errors, elapsed)
    return None


class Supervisor:
    """The thread that judges probations: every ``interval_s`` it calls
    ``check()`` while ``watching()`` is true; otherwise it sleeps until
    :meth:`wake` (hundreds of idle agents on one machine, or one on a Pi,
    should not wake 10 times a second). ``check`` runs on this thread and
    handles its own errors: one it raises ends the thread."""

    def __init__(self, watching: Callable[[], bool], check: Callable[[], None], interval_s: float) -> None:
        self._watching = watching
        self._check = check
        self._interval = interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-supervisor", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A probation began to be watched: start checking now."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._watching():
                self._wake.wait()
                self._wake.clear()
                continue
            if self._stop.wait(self._interval):
                break
            self._check()

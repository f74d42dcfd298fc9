"""The per-source inference loop: one thread per source runs its stages.

One :class:`SourceWorker` thread per source runs, turn after turn, a list of
stages (:mod:`edge_agent.pipeline.stages`): wait for the ``fps`` slot, take
the newest frame, acquire the model for that one frame and run
preprocess/infer/postprocess, apply the result throttle, build the result
message of CONTRACT §3 and hand it to every sink in order. A failing frame
is counted and logged (rate limited) and the loop goes on; it never takes
the agent down.

Who owns what, and thread-safety:

* The worker thread owns the loop, the stages and their state (the slot,
  the sequence number). It writes the watchdog's fields ``last_progress``,
  ``blocked_in`` and ``finished_cleanly`` (one attribute each, read by the
  watchdog without a lock).
* The settings (``fps``, ``threshold``, ``top_k``, ``results_enabled``,
  ``results_every``, and the model and label) are the one thing other
  threads change: the ``set`` command (a command thread) and a reload
  (``apply_config``). They live in one frozen :class:`Settings` snapshot;
  a writer builds a new one and swaps the reference under a lock that only
  writers take (two writers never lose each other's change), the worker
  thread reads the reference without a lock. It reads it when a turn begins
  (the ``fps`` of the wait for the slot) and again when it takes a frame:
  a frame is processed with one snapshot, never a mix of old and new
  values, and a change applies from the next frame on (a new ``fps`` within
  0.5 s, even in the middle of a long wait).
* ``cfg`` is replaced whole by ``apply_config`` and read by the agent
  (reload, the ``set`` command's targets), not by the worker thread.
* ``counters`` keeps its own lock (:class:`~edge_agent.telemetry.SourceCounters`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Sequence

from edge_agent.models.manager import ModelManager
from edge_agent.pipeline.detection import DetectionStage
from edge_agent.pipeline.batching import Batching
from edge_agent.pipeline.sinks import Sink
from edge_agent.pipeline.stages import (
    EmitToSinks,
    FpsThrottle,
    FrameContext,
    Infer,
    SampleResults,
    Settings,
    Stage,
    TakeNewest,
    build_envelope,
)
from edge_agent.sources import FrameSource
from edge_agent.telemetry import SourceCounters

log = logging.getLogger("edge_agent.pipeline")


def _setting(name: str) -> Any:
    """A worker attribute that reads one field of the current settings;
    assigning it is :meth:`SourceWorker.update` of that one field."""

    def get(worker: "SourceWorker") -> Any:
        return getattr(worker._settings, name)

    def set_(worker: "SourceWorker", value: Any) -> None:
        worker.update(**{name: value})

    return property(get, set_, doc=f"``Settings.{name}`` now; assigning it changes that one setting.")


class SourceWorker:
    """Runs one source through its model until the source ends or stop is set.

    ``stages`` is the list one turn runs (see :mod:`edge_agent.pipeline.stages`);
    built here, it must not change once the thread runs.
    """

    def __init__(
        self,
        source: FrameSource,
        models: ModelManager,
        sinks: Sequence[Sink],
        stop: threading.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
        events: Callable[[dict[str, Any]], None] | None = None,
        batching: Batching | None = None,
    ) -> None:
        self.source = source
        self.cfg = source.cfg
        self.models = models
        self.stop_event = stop
        # Running totals (``stats.frames``, ``stats.errors``) and the interval
        # telemetry drains, kept by one object under one lock per frame.
        self.counters = self.stats = SourceCounters()
        self._settings_lock = threading.Lock()  # writers only
        self._settings = Settings(
            model=self.cfg.model, label=self.cfg.label, fps=self.cfg.fps, threshold=self.cfg.threshold, top_k=self.cfg.top_k
        )
        self._thread: threading.Thread | None = None
        # For the watchdog (edge_agent.service): refreshed every loop turn
        # (at least every 0.5 s while idle); ``blocked_in`` names the call
        # in progress. ``finished_cleanly``: the loop ended, not the thread died.
        self.last_progress = time.monotonic()
        self.blocked_in: str | None = None
        self.finished_cleanly = False
        throttle = FpsThrottle(source, stop, lambda: self._settings, clock)
        # Filters, zones, tracker and detection events (``events``: the
        # agent's event path); the tracker lives as long as the worker.
        self.detection = DetectionStage(source.name, self.cfg, labels_of=self._labels_of, emit=events)
        self._infer = Infer(models, self.counters, source.name, source, batching)
        self.stages: list[Stage] = [
            throttle.wait,
            TakeNewest(source),
            throttle.claim,
            self._busy,
            self._infer,
            self.detection,
            SampleResults(),
            build_envelope,
            EmitToSinks(sinks, source.name),
        ]

    # ------------------------------------------------------------ settings

    @property
    def settings(self) -> Settings:
        """The settings now (an immutable snapshot)."""
        return self._settings

    def update(self, **changes: Any) -> Settings:
        """Change some settings at once (fields of :class:`Settings`); they
        apply from the next frame on. Returns the new snapshot. Any thread."""
        with self._settings_lock:
            self._settings = dataclasses.replace(self._settings, **changes)
            return self._settings

    fps = _setting("fps")
    threshold = _setting("threshold")
    top_k = _setting("top_k")
    results_enabled = _setting("results_enabled")
    results_every = _setting("results_every")

    def apply_config(self, cfg: Any) -> None:
        """A reloaded config for the same source and model: its ``fps``,
        ``threshold`` and ``top_k`` apply from the next frame on, together.
        Any thread (see the module docstring)."""
        self.cfg = cfg
        self.detection.configure(cfg)
        self.update(model=cfg.model, label=cfg.label, fps=cfg.fps, threshold=cfg.threshold, top_k=cfg.top_k)

    # ------------------------------------------------------------ the thread

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.source.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # the per-frame guard is in the Infer stage: this is a bug
            log.exception("source %s: the inference loop crashed; the watchdog reports it", self.source.name)
        else:
            self.finished_cleanly = True
        finally:
            self._infer.detach()  # a batch no longer waits for this source's frames

    def _loop(self) -> None:
        stages = self.stages
        stop = self.stop_event
        while not stop.is_set():
            self.last_progress = time.monotonic()
            turn = ctx = FrameContext(self._settings)
            for stage in stages:
                ctx = stage(ctx)
                if ctx is None:
                    break
            self.blocked_in = None
            if turn.end:
                self.detection.flush(time.time())  # the input ended: its objects are gone
                break

    def _labels_of(self, model: str, version: int) -> Any:
        """The class names of a served version (the detection stage's allow-list check)."""
        with self.models.acquire(model, version=version) as m:
            return m.postprocess.labels

    def check_labels(self) -> list[str]:
        """Check the allow-list against the version serving this source now
        (at start and at a reload, before any frame); returns the labels the
        model does not have. Any thread."""
        try:
            with self.models.acquire(self.cfg.model, self.cfg.label) as m:
                model, version = m.name, m.version
        except Exception:  # nothing serves yet: the first frame checks
            return []
        return self.detection.check_model(model, version)

    def _busy(self, ctx: FrameContext) -> FrameContext:
        """The watchdog's mark: from the frame taken to the result emitted."""
        self.blocked_in = "processing a frame"
        return ctx

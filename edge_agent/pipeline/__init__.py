"""The per-source inference loop: frame -> model -> result -> sinks.

One :class:`SourceWorker` thread per source takes the newest frame (honouring
the source's ``fps`` cap), acquires the model for that one frame, runs
preprocess/infer/postprocess, builds the result message of CONTRACT §3 and
hands it to every sink in order. A failing frame is counted and logged (rate
limited) and the loop goes on; it never takes the agent down.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol, Sequence

from edge_agent.errors import EdgeAgentError
from edge_agent.models.manager import ModelManager
from edge_agent.sources import FrameSource
from edge_agent.telemetry import SourceCounters

log = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives every result; must not block for long (it runs in the loop)."""

    def emit(self, source: str, result: dict[str, Any]) -> None: ...


class LogSink:
    """One readable log line per result."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.log = logger or logging.getLogger("edge_agent.results")

    def emit(self, source: str, result: dict[str, Any]) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return  # per frame: do not build a line nobody will see
        if "top" in result:
            what = ", ".join(f"{t['label']} {t['score']:.2f}" for t in result["top"][:3]) or "nothing above threshold"
        else:
            dets = result.get("detections", [])
            what = f"{len(dets)} detection(s)" + "".join(
                f"; {d['label']} {d['score']:.2f} at {[int(v) for v in d['box']]}" for d in dets[:3]
            )
        self.log.info(
            "%s frame %d: %s v%d %.1f ms: %s",
            source,
            result["frame"],
            result["model"],
            result["version"],
            result["latency_ms"],
            what,
        )


class SourceWorker:
    """Runs one source through its model until the source ends or stop is set."""

    def __init__(
        self,
        source: FrameSource,
        models: ModelManager,
        sinks: Sequence[Sink],
        stop: threading.Event,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.cfg = source.cfg
        self.models = models
        self.sinks = list(sinks)
        self.stop_event = stop
        # Running totals (``stats.frames``, ``stats.errors``) and the interval
        # telemetry drains, kept by one object under one lock per frame.
        self.counters = self.stats = SourceCounters()
        self.fps = self.cfg.fps
        # The `set` command's result throttle: publish one result in `results_every`.
        self.results_enabled = True
        self.results_every = 1
        self.top_k = self.cfg.top_k
        self.threshold = self.cfg.threshold
        self._clock = clock
        self._seq = 0
        self._thread: threading.Thread | None = None
        # For the watchdog (edge_agent.service): refreshed every loop turn
        # (at least every 0.5 s while idle); ``blocked_in`` names the call
        # in progress. ``finished_cleanly``: the loop ended, not the thread died.
        self.last_progress = time.monotonic()
        self.blocked_in: str | None = None
        self.finished_cleanly = False

    def apply_config(self, cfg: Any) -> None:
        """A reloaded config for the same source and model: its ``fps``,
        ``threshold`` and ``top_k`` apply from the next frame on.

        Thread-safety: these settings are plain attributes, read once per
        frame by the worker thread and replaced whole (never mutated) by
        command or reload threads; a frame sees either the old or the new
        value, never a mix.
        """
        self.cfg = cfg
        self.fps = cfg.fps
        self.threshold = cfg.threshold
        self.top_k = cfg.top_k

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
        except Exception:  # the per-frame guard is in _process: this is a bug
            log.exception("source %s: the inference loop crashed; the watchdog reports it", self.source.name)
        else:
            self.finished_cleanly = True

    def _loop(self) -> None:
        last_slot: float | None = None  # when the previous frame's slot was
        while not self.stop_event.is_set():
            self.last_progress = time.monotonic()
            fps = self.fps
            due = last_slot + 1.0 / fps if (fps and last_slot is not None) else self._clock()
            delay = due - self._clock()
            # The source decodes only frames grabbed near the slot (its clock
            # is monotonic); told every turn, so a new fps applies at once.
            self.source.want_after(time.monotonic() + delay if fps else None)
            if delay > 0:
                # Wait for the slot in steps: the watchdog sees progress at
                # any fps (a time-lapse at fps = 0.01), and a `set` or reload
                # that changes fps applies at once.
                if self.stop_event.wait(min(delay, 0.5)):
                    break
                continue
            frame = self.source.next_frame(timeout=0.5)
            if frame is None:
                if self.source.finished:
                    break
                continue
            now = self._clock()
            last_slot = max(due, now - 1.0 / fps) if fps else now
            if fps:
                self.source.want_after(time.monotonic() + (last_slot + 1.0 / fps) - now)
            self.blocked_in = "processing a frame"
            self._process(frame)
            self.blocked_in = None

    def _process(self, frame: Any) -> None:
        try:
            with self.models.acquire(self.cfg.model, self.cfg.label) as model:
                out = model.process(frame.image, top_k=self.top_k, threshold=self.threshold)
                name, version = model.name, model.version
        except EdgeAgentError as exc:
            self._failed(frame.index, str(exc))
            return
        except Exception as exc:  # a bug in one frame must not end the loop
            self._failed(frame.index, f"{type(exc).__name__}: {exc}")
            return
        self.counters.frame(out.latency_ms)
        self._seq += 1
        if not self.results_enabled or self._seq % self.results_every:
            return
        result: dict[str, Any] = {
            "ts": frame.ts,
            "seq": self._seq,
            "frame": frame.index,
            "model": name,
            "version": version,
            "latency_ms": round(out.latency_ms, 3),
            **out.payload,
        }
        for sink in self.sinks:
            try:
                sink.emit(self.source.name, result)
            except Exception:
                log.exception("source %s: a result sink failed", self.source.name)

    def _failed(self, index: int, message: str) -> None:
        n = self.counters.error()
        if n <= 5 or n % 100 == 0:
            log.error("source %s frame %d: %s (%d errors so far)", self.source.name, index, message, n)

"""The steps of one loop turn of a :class:`~edge_agent.pipeline.worker.SourceWorker`.

A stage is a callable ``stage(ctx) -> ctx | None`` over one turn's
:class:`FrameContext`: it reads what earlier stages left there, adds its
part and returns the context for the next stage, or returns None to end
the turn (no slot yet, no frame yet, a failed frame, a result not
published). The worker runs its list in order, once per turn:

1. :meth:`FpsThrottle.wait`: wait for the fps slot (in steps of at most
   0.5 s, so a new fps applies at once and the watchdog sees progress)
2. :class:`TakeNewest`: the newest frame of the source
3. :meth:`FpsThrottle.claim`: that frame takes the slot; the frame's
   settings are fixed here
4. (the worker's watchdog mark: "processing a frame")
5. :class:`Infer`: acquire the model for this one frame (or, for a model
   with ``batch_size > 1``, submit the frame to the model's batching point,
   :mod:`edge_agent.pipeline.batching`, and wait for its result), infer and
   postprocess (the frame comes preprocessed from the capture thread, tagged
   with the preprocessing it was made for; preprocessed again when that is
   not this model's); a failure is counted, logged (rate limited) and ends
   the turn
6. :class:`SampleResults`: number the result; the ``set`` command's
   result throttle (``results.enabled``, one in ``results.every``)
7. :func:`build_envelope`: the result message of CONTRACT §3
8. :class:`EmitToSinks`: hand it to every sink in order

Thread-safety: a stage and the context belong to the worker thread that
runs them; stage state (the slot, the sequence number) is touched by that
thread only. What other threads change, the settings, reaches a stage
only as the immutable :class:`Settings` snapshot a context carries.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from edge_agent.errors import EdgeAgentError
from edge_agent.sources import FrameSource
from edge_agent.telemetry import SourceCounters

if TYPE_CHECKING:
    from edge_agent.models.manager import ModelManager
    from edge_agent.pipeline.batching import Batcher, Batching
    from edge_agent.models.servable import Inference
    from edge_agent.pipeline.sinks import Sink
    from edge_agent.sources import Frame

log = logging.getLogger("edge_agent.pipeline")

Stage = Callable[["FrameContext"], "FrameContext | None"]


@dataclass(frozen=True)
class Settings:
    """A source's run-time settings (the ``set`` command's and a reload's),
    one immutable snapshot: replaced whole, never changed in place."""

    model: str
    label: str | None
    fps: float | None
    threshold: float | None
    top_k: int | None
    results_enabled: bool = True  # the `set` command's result throttle:
    results_every: int = 1  # publish one result in `results_every`


class FrameContext:
    """What one loop turn knows so far; each stage fills in its part."""

    __slots__ = ("settings", "due", "end", "frame", "model", "version", "inference", "seq", "result")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # the worker's settings when the turn began; fixed at claim
        self.due = 0.0  # the slot this turn waits for (the worker's clock)
        self.end = False  # the source has ended: the loop stops after this turn
        self.frame: Frame | None = None
        self.model = ""  # the name and version that served the frame
        self.version = 0
        self.inference: Inference | None = None
        self.seq = 0
        self.result: dict[str, Any] | None = None


class FpsThrottle:
    """The ``fps`` cap: one frame per slot of ``1/fps`` seconds, and the
    source told when the next frame is wanted (frames before it are grabbed,
    not decoded). ``current`` returns the worker's settings now (read at
    claim, so a frame is processed with the settings of the moment it is
    taken)."""

    def __init__(
        self,
        source: FrameSource,
        stop: threading.Event,
        current: Callable[[], Settings],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.stop = stop
        self.current = current
        self.clock = clock
        self.last_slot: float | None = None  # when the previous frame's slot was

    def wait(self, ctx: FrameContext) -> FrameContext | None:
        fps = ctx.settings.fps
        last_slot = self.last_slot
        due = last_slot + 1.0 / fps if (fps and last_slot is not None) else self.clock()
        delay = due - self.clock()
        # The source decodes only frames grabbed near the slot (its clock
        # is monotonic); told every turn, so a new fps applies at once.
        self.source.want_after(time.monotonic() + delay if fps else None)
        if delay > 0:
            # Wait for the slot in steps: the watchdog sees progress at any
            # fps (a time-lapse at fps = 0.01), and a `set` or reload that
            # changes fps applies at once.
            self.stop.wait(min(delay, 0.5))
            return None
        ctx.due = due
        return ctx

    def claim(self, ctx: FrameContext) -> FrameContext:
        fps = ctx.settings.fps
        now = self.clock()
        self.last_slot = last_slot = max(ctx.due, now - 1.0 / fps) if fps else now
        if fps:
            self.source.want_after(time.monotonic() + (last_slot + 1.0 / fps) - now)
        ctx.settings = self.current()
        return ctx


class TakeNewest:
    """The newest frame in the source's mailbox (waiting up to 0.5 s for
    one); at the end of a file or folder the turn ends the loop."""

    def __init__(self, source: FrameSource) -> None:
        self.source = source

    def __call__(self, ctx: FrameContext) -> FrameContext | None:
        frame = self.source.next_frame(timeout=0.5)
        if frame is None:
            ctx.end = self.source.finished
            return None
        ctx.frame = frame
        return ctx


class Infer:
    """The model for this one frame: acquire, process, release. A frame
    that fails is counted and logged (the first five, then every 100th)
    and the loop goes on; a bug in one frame never ends it."""

    def __init__(
        self,
        models: ModelManager,
        counters: SourceCounters,
        source_name: str,
        source: FrameSource | None = None,
        batching: Batching | None = None,
    ) -> None:
        self.models = models
        self.counters = counters
        self.source_name = source_name
        self.source = source
        self.batching = batching
        self._prepares_for: Any = None  # the preprocessor the source was last told to use
        self._batcher: Batcher | None = None  # the one this worker is attached to

    def batcher(self, s: Settings) -> Batcher | None:
        """The batching point of the frame's model and label (None: not
        batched); the worker is attached to the one it uses now."""
        b = self.batching.get(s.model, s.label) if self.batching else None
        if b is not self._batcher:
            self.detach()
            if b is not None:
                b.attach()
            self._batcher = b
        return b

    def detach(self) -> None:
        """The worker ends: its batcher no longer waits for its frames."""
        if self._batcher is not None:
            self._batcher.detach()
            self._batcher = None

    def __call__(self, ctx: FrameContext) -> FrameContext | None:
        s, frame = ctx.settings, ctx.frame
        try:
            batcher = self.batcher(s)
            if batcher is not None:
                out, model = batcher.run(frame, s.top_k, s.threshold)
            else:
                with self.models.acquire(s.model, s.label) as model:
                    out = model.process(frame.image, top_k=s.top_k, threshold=s.threshold, prepared=frame.prepared)
            ctx.model, ctx.version = model.name, model.version
            self._prepare_next(model)
        except EdgeAgentError as exc:
            self._failed(frame.index, str(exc))
            return None
        except Exception as exc:  # a bug in one frame must not end the loop
            self._failed(frame.index, f"{type(exc).__name__}: {exc}")
            return None
        self.counters.frame(out.latency_ms)
        ctx.inference = out
        return ctx

    def _prepare_next(self, model: Any) -> None:
        """The source preprocesses its next frames in its capture thread for
        the model that served this one (each tagged with that preprocessing;
        a frame made for another one after a swap is redone by the model)."""
        pre = getattr(model, "preprocess", None)  # None: a test double without preprocessing
        if self.source is not None and pre is not None and pre is not self._prepares_for:
            self._prepares_for = pre
            self.source.prepare_with(pre.prepare)

    def _failed(self, index: int, message: str) -> None:
        n = self.counters.error()
        if n <= 5 or n % 100 == 0:
            log.error("source %s frame %d: %s (%d errors so far)", self.source_name, index, message, n)


class SampleResults:
    """Numbers every inferred frame (``seq``, from 1) and lets through the
    results to publish: none while ``results_enabled`` is off, else one in
    ``results_every``."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, ctx: FrameContext) -> FrameContext | None:
        self.seq += 1
        s = ctx.settings
        if not s.results_enabled or self.seq % s.results_every:
            return None
        ctx.seq = self.seq
        return ctx


def build_envelope(ctx: FrameContext) -> FrameContext:
    """The result message (CONTRACT §3): the frame's time, numbers, the
    model and version that served it, the latency, then the task's part
    (``top`` or ``detections``)."""
    frame, out = ctx.frame, ctx.inference
    ctx.result = {
        "ts": frame.ts,
        "seq": ctx.seq,
        "frame": frame.index,
        "model": ctx.model,
        "version": ctx.version,
        "latency_ms": round(out.latency_ms, 3),
        **out.payload,
    }
    return ctx


class EmitToSinks:
    """The result to every sink in order; a sink that fails is logged and
    the others still get it."""

    def __init__(self, sinks: Sequence[Sink], source_name: str) -> None:
        self.sinks = list(sinks)
        self.source_name = source_name

    def __call__(self, ctx: FrameContext) -> FrameContext:
        result = ctx.result
        for sink in self.sinks:
            try:
                sink.emit(self.source_name, result)
            except Exception:
                log.exception("source %s: a result sink failed", self.source_name)
        return ctx

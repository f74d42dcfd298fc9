"""The detection stage of a source's worker: filters, zones, tracking and
events, applied to a detector's ``detections`` (a classifier's ``top`` goes
through untouched).

In the worker's stage list it comes right after :class:`~.stages.Infer`
and before the result throttle, so the tracker sees every inferred frame
even when results are published one in N. Per frame, in order:

1. filters: the ``labels`` allow-list, the per-label ``thresholds``, the
   ``min_box_area`` (pixels² of the source frame);
2. zones: each detection gets ``zones``, the names of the zones its anchor
   point lies in (:mod:`.zones`);
3. tracking (``track = true``): each detection gets ``track_id``
   (:mod:`.tracking`), and the tracker's debounced events go out through
   the agent's event path (``P/D/events``, no command id);
4. counts per zone and label for telemetry (:meth:`DetectionStage.counts`).

Bad input is reported, never fatal: a label in ``labels`` that the serving
model does not have is logged as an error (and published as a
``label_unknown`` event) at start, at a reload and whenever another model
version serves the source; a zone outside the frame is reported
(``zone_outside_frame``) at the first frame and whenever the frame size
changes.

The tracker belongs to the source's worker, not to the model: a new model
version (an activation, a rollback, a canary label) keeps the tracks and
their ids.

Thread-safety: the stage runs on its worker's thread. :meth:`configure`
(a reload, any thread) swaps one immutable spec; :meth:`counts` (the
telemetry thread) reads under a lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from edge_agent.pipeline.tracking import Tracker, TrackEvent
from edge_agent.pipeline.zones import Zone, frame_coverage, zones_of

if TYPE_CHECKING:
    from edge_agent.config import SourceConfig
    from edge_agent.pipeline.stages import FrameContext

log = logging.getLogger("edge_agent.pipeline")
events_log = logging.getLogger("edge_agent.events")

LabelsOf = Callable[[str, int], "Sequence[str] | None"]
"""(model, version) -> that version's class names (None: it has none)."""


@dataclass(frozen=True)
class DetectionSpec:
    """A source's detection settings, one immutable snapshot."""

    labels: frozenset[str] | None = None
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)
    min_box_area: float = 0.0
    zones: tuple[Zone, ...] = ()
    track: bool = False
    min_frames: int = 3
    lost_frames: int = 5
    iou: float = 0.3

    @classmethod
    def of(cls, cfg: "SourceConfig") -> "DetectionSpec":
        """From a source's config (keys it lacks take their defaults)."""
        labels = getattr(cfg, "labels", None)
        events = getattr(cfg, "events", None)
        return cls(
            labels=frozenset(labels) if labels is not None else None,
            thresholds=dict(getattr(cfg, "thresholds", None) or {}),
            min_box_area=getattr(cfg, "min_box_area", 0.0) or 0.0,
            zones=tuple(Zone.of(z.name, z.points, z.anchor) for z in getattr(cfg, "zones", None) or ()),
            track=bool(getattr(cfg, "track", False)),
            min_frames=events.min_frames if events is not None else 3,
            lost_frames=events.lost_frames if events is not None else 5,
            iou=events.iou if events is not None else 0.3,
        )

    @property
    def active(self) -> bool:
        return bool(self.labels is not None or self.thresholds or self.min_box_area or self.zones or self.track)


def filter_detections(detections: Sequence[dict[str, Any]], spec: DetectionSpec) -> list[dict[str, Any]]:
    """The detections the allow-list, the per-label thresholds and the
    minimum box area let through, in order."""
    out = []
    for d in detections:
        label = d["label"]
        if spec.labels is not None and label not in spec.labels:
            continue
        if d["score"] < spec.thresholds.get(label, 0.0):
            continue
        x0, y0, x1, y1 = d["box"]
        if spec.min_box_area and (x1 - x0) * (y1 - y0) < spec.min_box_area:
            continue
        out.append(d)
    return out


def unknown_labels(wanted: frozenset[str] | None, model_labels: Sequence[str] | None) -> list[str]:
    """The allow-list's labels the model does not have (none when either is unknown)."""
    if wanted is None or model_labels is None:
        return []
    have = set(model_labels)
    return sorted(label for label in wanted if label not in have)


class DetectionStage:
    """One source's filters, zones, tracker and counts (see the module docstring)."""

    def __init__(
        self,
        source_name: str,
        cfg: "SourceConfig",
        *,
        labels_of: LabelsOf | None = None,
        emit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.source_name = source_name
        self.labels_of = labels_of
        self.emit = emit
        self.spec = DetectionSpec.of(cfg)
        self.tracker = Tracker(iou=self.spec.iou, min_frames=self.spec.min_frames, lost_frames=self.spec.lost_frames)
        self._checked: tuple[str, int, DetectionSpec] | None = None  # the model version and spec last checked
        self._frame_size: tuple[tuple[int, int], DetectionSpec] | None = None
        self._warned_classifier = False
        self._check_lock = threading.Lock()  # the worker's first frame and a reload's check, one at a time
        self._lock = threading.Lock()  # guards _counts
        self._counts: dict[str, dict[str, dict[str, int]]] = {}

    # ------------------------------------------------------------ settings

    def configure(self, cfg: "SourceConfig") -> None:
        """A reloaded config: new filters and zones from the next frame; the
        tracker and its ids stay (its debounce takes the new numbers)."""
        spec = DetectionSpec.of(cfg)
        t = self.tracker
        t.iou, t.min_frames, t.lost_frames = spec.iou, spec.min_frames, spec.lost_frames
        self.spec = spec

    # ------------------------------------------------------------ the stage

    def __call__(self, ctx: "FrameContext") -> "FrameContext":
        spec = self.spec
        out = ctx.inference
        if out is None or not spec.active:
            return ctx
        detections = out.payload.get("detections")
        if detections is None:
            if not self._warned_classifier:
                self._warned_classifier = True
                log.warning("source %s: labels/thresholds/min_box_area/track/zones apply to detectors only; "
                            "model %s gives no detections, they are ignored", self.source_name, ctx.model)
            return ctx
        self.check_model(ctx.model, ctx.version, spec)
        frame = ctx.frame
        if spec.zones:
            self._check_frame(frame.image.shape[1], frame.image.shape[0], spec)
        kept = filter_detections(detections, spec)
        if not (spec.zones or spec.track):  # filters only: nothing to add to the detections
            ctx.inference = dataclasses.replace(out, payload={**out.payload, "detections": kept})
            return ctx
        boxes = np.array([d["box"] for d in kept], dtype=np.float64).reshape(-1, 4)
        zones = zones_of(boxes, spec.zones) if spec.zones else None
        annotated = [dict(d) for d in kept]
        if zones is not None:
            for d, z in zip(annotated, zones):
                d["zones"] = z
        if spec.track:
            ids, events = self.tracker.update(boxes, [d["label"] for d in kept], [d["score"] for d in kept], zones,
                                              frame.ts)
            for d, track_id in zip(annotated, ids):
                d["track_id"] = track_id
            self._publish(events)
        if spec.zones:
            self._count(annotated, spec)
        ctx.inference = dataclasses.replace(out, payload={**out.payload, "detections": annotated})
        return ctx

    def flush(self, ts: float) -> None:
        """The source ended: every track is gone (events published)."""
        if self.spec.track:
            self._publish(self.tracker.flush(ts))

    # ------------------------------------------------------------ checks

    def check_model(self, model: str, version: int, spec: DetectionSpec | None = None) -> list[str]:
        """Check the allow-list against ``model`` ``version``'s labels, once
        per version (and per config); returns the labels it does not have."""
        spec = spec or self.spec
        if self._checked == (model, version, spec) or self.labels_of is None:
            return []
        with self._check_lock:
            if self._checked == (model, version, spec):
                return []
            self._checked = (model, version, spec)
            return self._check_labels(model, version, spec)

    def _check_labels(self, model: str, version: int, spec: DetectionSpec) -> list[str]:
        if spec.labels is None:
            return []
        try:
            have = self.labels_of(model, version)
        except Exception as exc:  # the version went away meanwhile: the next frame's checks it
            log.debug("source %s: cannot read the labels of %s v%s: %s", self.source_name, model, version, exc)
            self._checked = None
            return []
        missing = unknown_labels(spec.labels, have)
        if missing:
            shown = ", ".join(have[:100]) + (f", ... ({len(have)} in all)" if len(have) > 100 else "")
            log.error("source %s: label(s) %s in `labels` are not labels of model %s v%d, so they are never "
                      "reported; the model's labels: %s", self.source_name, ", ".join(map(repr, missing)),
                      model, version, shown)
            self._send({"event": "label_unknown", "source": self.source_name, "model": model, "version": version,
                        "labels": missing, "model_labels": list(have)})
        return missing

    def _check_frame(self, width: int, height: int, spec: DetectionSpec) -> None:
        if self._frame_size == ((width, height), spec):
            return
        self._frame_size = ((width, height), spec)
        for zone in spec.zones:
            where = frame_coverage(zone.polygon, width, height)
            if where == "inside":
                continue
            log.warning("source %s: zone %r lies %s the %dx%d frame%s (zone points %s)", self.source_name, zone.name,
                        "entirely outside" if where == "outside" else "partly outside", width, height,
                        ": no detection can ever be in it" if where == "outside" else "", zone.polygon.tolist())
            self._send({"event": "zone_outside_frame", "source": self.source_name, "zone": zone.name,
                        "coverage": where, "frame": [width, height], "points": zone.polygon.tolist()})

    # ------------------------------------------------------------ events, counts

    def _publish(self, events: list[TrackEvent]) -> None:
        for e in events:
            t = e.track
            msg: dict[str, Any] = {"ts": e.ts, "event": e.event, "source": self.source_name}
            if e.zone is not None:
                msg["zone"] = e.zone
            msg.update(label=t.label, track_id=t.id, score=round(t.score, 6), first_seen=t.first_seen,
                       last_seen=t.last_seen, frames=t.frames)
            events_log.info("source %s: %s %s #%d%s", self.source_name, e.event, t.label, t.id,
                            f" zone {e.zone}" if e.zone else "")
            if e.zone is not None:
                with self._lock:
                    c = self._counts.setdefault(e.zone, {}).setdefault(t.label, {"count": 0, "entered": 0})
                    if e.event == "object_entered":
                        c["count"] += 1
                        c["entered"] += 1
                    else:
                        c["count"] = max(0, c["count"] - 1)
            self._send(msg)

    def _count(self, detections: list[dict[str, Any]], spec: DetectionSpec) -> None:
        """Without tracking, a zone's count is its detections on the latest frame."""
        with self._lock:
            for zone in spec.zones:
                self._counts.setdefault(zone.name, {})
            if spec.track:
                return
            for per_label in self._counts.values():
                for c in per_label.values():
                    c["count"] = 0
            for d in detections:
                for name in d.get("zones", ()):
                    self._counts[name].setdefault(d["label"], {"count": 0, "entered": 0})["count"] += 1

    def counts(self) -> dict[str, dict[str, dict[str, int]]] | None:
        """``{zone: {label: {"count", "entered"}}}`` for telemetry (None without zones). Any thread."""
        if not self.spec.zones:
            return None
        names = [z.name for z in self.spec.zones]
        with self._lock:
            return {name: {label: dict(c) for label, c in self._counts.get(name, {}).items()} for name in names}

    def _send(self, message: dict[str, Any]) -> None:
        if self.emit is None:
            return
        try:
            self.emit(message)
        except Exception:
            log.exception("source %s: an event sink failed", self.source_name)

"""Filters, zones, the tracker and the debounce of detection events: pure,
table-driven tests on boxes made up here (no model, no video)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest

from edge_agent.config import parse_config
from edge_agent.errors import ConfigError
from edge_agent.models.servable import Inference
from edge_agent.pipeline.detection import DetectionSpec, DetectionStage, filter_detections, unknown_labels
from edge_agent.pipeline.stages import FrameContext, Settings
from edge_agent.pipeline.tracking import Tracker, greedy_match, iou_matrix
from edge_agent.pipeline.zones import Zone, frame_coverage, points_in_polygon, zones_of
from edge_agent.sources import Frame

SQUARE = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
L_SHAPE = np.array([[0, 0], [10, 0], [10, 4], [4, 4], [4, 10], [0, 10]], float)  # concave


# ------------------------------------------------------------------ zones


@pytest.mark.parametrize("poly, point, inside", [
    (SQUARE, (5, 5), True),
    (SQUARE, (11, 5), False),
    (SQUARE, (-1, 5), False),
    (SQUARE, (5, 10.5), False),
    (L_SHAPE, (2, 8), True),   # the L's vertical arm
    (L_SHAPE, (8, 2), True),   # its horizontal arm
    (L_SHAPE, (8, 8), False),  # the notch a convex test would count in
])
def test_points_in_polygon(poly, point, inside) -> None:
    assert bool(points_in_polygon(np.array([point], float), poly)[0]) is inside


def test_two_zones_sharing_an_edge_never_both_hold_a_point() -> None:
    left, right = np.array([[0, 0], [5, 0], [5, 10], [0, 10]], float), np.array([[5, 0], [10, 0], [10, 10], [5, 10]], float)
    pts = np.array([[5, y] for y in np.linspace(0.5, 9.5, 10)] + [[4.999, 3], [5.001, 3]], float)
    both = points_in_polygon(pts, left) & points_in_polygon(pts, right)
    either = points_in_polygon(pts, left) | points_in_polygon(pts, right)
    assert not both.any() and either.all()


@pytest.mark.parametrize("anchor, box, expect", [
    ("bottom_center", [2, 2, 8, 8], ["a"]),      # bottom centre (5, 8) in a
    ("bottom_center", [2, 6, 8, 14], []),        # feet at (5, 14): below a
    ("center", [2, 6, 8, 14], []),               # centre (5, 10): on a's bottom edge, outside
    ("center", [2, 4, 8, 12], ["a"]),            # centre (5, 8)
    ("center", [12, 2, 18, 8], ["b"]),
])
def test_zones_of_uses_the_anchor_point(anchor, box, expect) -> None:
    zones = [Zone.of("a", SQUARE, anchor), Zone.of("b", SQUARE + [10, 0], anchor)]
    assert zones_of(np.array([box], float), zones) == [expect]


@pytest.mark.parametrize("points, where", [
    ([[0, 0], [640, 0], [640, 480], [0, 480]], "inside"),
    ([[600, 0], [700, 0], [700, 100], [600, 100]], "partly"),
    ([[700, 0], [800, 0], [800, 100]], "outside"),
    ([[-10, -10], [1000, -10], [1000, 1000], [-10, 1000]], "partly"),  # bigger than the frame: covers it
    ([[-100, -100], [-50, -100], [-50, -50]], "outside"),
])
def test_frame_coverage(points, where) -> None:
    assert frame_coverage(np.array(points, float), 640, 480) == where


# ------------------------------------------------------------------ filters


def det(label: str, score: float, box=(0, 0, 10, 10)) -> dict:
    return {"label": label, "score": score, "box": list(box)}


@pytest.mark.parametrize("spec, expect", [
    (DetectionSpec(), ["person", "car", "dog", "person"]),
    (DetectionSpec(labels=frozenset({"person"})), ["person", "person"]),
    (DetectionSpec(thresholds={"person": 0.6}), ["person", "car", "dog"]),
    (DetectionSpec(min_box_area=150), ["person", "dog"]),
    (DetectionSpec(labels=frozenset({"person", "dog"}), thresholds={"person": 0.6}, min_box_area=150), ["person", "dog"]),
])
def test_filters(spec, expect) -> None:
    dets = [det("person", 0.9, (0, 0, 20, 20)), det("car", 0.5), det("dog", 0.4, (0, 0, 20, 10)), det("person", 0.5)]
    assert [d["label"] for d in filter_detections(dets, spec)] == expect


@pytest.mark.parametrize("wanted, have, missing", [
    (None, ["a"], []),
    (frozenset({"a"}), None, []),
    (frozenset({"a", "Person"}), ["a", "person"], ["Person"]),
])
def test_unknown_labels(wanted, have, missing) -> None:
    assert unknown_labels(wanted, have) == missing


# ------------------------------------------------------------------ tracker


def test_iou_and_greedy_match() -> None:
    ious = iou_matrix([[0, 0, 10, 10], [20, 0, 30, 10]], [[0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 110, 110]])
    np.testing.assert_allclose(ious, [[1, 1 / 3, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert greedy_match(scores, 0.3) == [(0, 0)]  # row 1's best column is taken; its other pair is below 0.3
    assert greedy_match(np.array([[0.9, 0.8], [0.85, 0.4]]), 0.3) == [(0, 0), (1, 1)]
    assert greedy_match(np.zeros((0, 3)), 0.3) == []


def run(tracker: Tracker, frames: list[list[tuple]], zones_per_frame=None):
    """frames: per frame, (label, box) tuples; returns the ids per frame and all events as tuples."""
    ids, events = [], []
    for i, dets in enumerate(frames):
        boxes = np.array([b for _, b in dets], float).reshape(-1, 4)
        zones = zones_per_frame[i] if zones_per_frame else None
        got, evs = tracker.update(boxes, [lab for lab, _ in dets], [0.9] * len(dets), zones, float(i))
        ids.append(got)
        events += [(i, e.event, e.track.id, e.zone) for e in evs]
    return ids, events


def moving(x0: float, step: float, n: int, y: float = 100, size: float = 60) -> list[tuple]:
    return [(x0 + step * i, y, x0 + step * i + size, y + size) for i in range(n)]


def test_two_objects_moving_keep_their_ids() -> None:
    a, b = moving(0, 20, 15), moving(600, -20, 15, y=300)
    ids, events = run(Tracker(min_frames=3), [[("face", a[i]), ("face", b[i])] for i in range(15)])
    assert all(got == [1, 2] for got in ids), ids
    assert events == [(2, "object_appeared", 1, None), (2, "object_appeared", 2, None)]


def test_velocity_carries_a_track_over_a_gap() -> None:
    """Fast motion (a third of the box per frame) and two frames without a detection: the
    Kalman prediction is where the object comes back, so the id stays."""
    path = moving(0, 20, 12)
    frames = [[("car", path[i])] if i not in (6, 7) else [] for i in range(12)]
    ids, events = run(Tracker(min_frames=2, lost_frames=3), frames)
    assert {i for got in ids for i in got} == {1}
    assert [e[1] for e in events] == ["object_appeared"]


@pytest.mark.parametrize("gap, lost_frames, expect_ids, expect_events", [
    (2, 3, {1}, ["object_appeared"]),
    (3, 3, {1, 2}, ["object_appeared", "object_gone", "object_appeared"]),
])
def test_lost_frames_ends_a_track(gap, lost_frames, expect_ids, expect_events) -> None:
    box = (10, 10, 70, 70)
    frames = [[("p", box)]] * 4 + [[]] * gap + [[("p", box)]] * 4
    ids, events = run(Tracker(min_frames=2, lost_frames=lost_frames), frames)
    assert {i for got in ids for i in got} == expect_ids
    assert [e[1] for e in events] == expect_events


def test_a_flicker_shorter_than_min_frames_says_nothing() -> None:
    frames = [[("p", (0, 0, 50, 50))]] * 2 + [[]] * 10
    _, events = run(Tracker(min_frames=3, lost_frames=2), frames)
    assert events == []


def test_labels_are_tracked_apart() -> None:
    box = (0, 0, 50, 50)
    ids, _ = run(Tracker(), [[("cat", box)], [("dog", box)]])
    assert ids == [[1], [2]]


@pytest.mark.parametrize("inside, expect", [
    # frames in the zone (1) or out of it (0); min_frames 3
    ("000111111000", [(2, "object_appeared"), (5, "object_entered"), (11, "object_left")]),
    ("111111", [(2, "object_appeared"), (2, "object_entered")]),  # appears inside: enters when confirmed
    ("0001101101100000", [(2, "object_appeared")]),  # jitter on the zone's border: never 3 in a row
    ("00011101", [(2, "object_appeared"), (5, "object_entered")]),  # one frame out is not leaving
    ("000000", [(2, "object_appeared")]),  # a standing object outside the zone
])
def test_zone_debounce(inside, expect) -> None:
    frames = [[("p", (0, 0, 50, 50))]] * len(inside)
    zones = [[["door"] if c == "1" else []] for c in inside]
    _, events = run(Tracker(min_frames=3), frames, zones)
    assert [(i, ev) for i, ev, _, _ in events] == expect
    assert all(z == "door" for _, ev, _, z in events if ev.startswith("object_") and ev in ("object_entered", "object_left"))


def test_a_track_gone_inside_a_zone_leaves_it_first() -> None:
    frames = [[("p", (0, 0, 50, 50))]] * 4 + [[]] * 2
    _, events = run(Tracker(min_frames=2, lost_frames=2), frames, [[["door"]]] * 4 + [[]] * 2)
    assert [(ev, z) for _, ev, _, z in events] == [
        ("object_appeared", None), ("object_entered", "door"), ("object_left", "door"), ("object_gone", None)]


def test_flush_ends_confirmed_tracks() -> None:
    t = Tracker(min_frames=1)
    run(t, [[("p", (0, 0, 50, 50))]], [[["door"]]])
    assert [(e.event, e.zone) for e in t.flush(9.0)] == [("object_left", "door"), ("object_gone", None)]
    assert t.tracks == []


# ------------------------------------------------------------------ the stage


def source_cfg(**detect) -> object:
    cfg = parse_config({"models": [{"name": "m"}],
                        "sources": [{"name": "cam", "uri": "0", "model": "m", **detect}]})
    return cfg.sources[0]


def ctx_of(dets: list[dict] | None, ts: float, shape=(480, 640, 3), version: int = 1) -> FrameContext:
    ctx = FrameContext(Settings(model="m", label=None, fps=None, threshold=None, top_k=None))
    ctx.frame = Frame(image=np.zeros(shape, np.uint8), index=int(ts), ts=ts)
    ctx.model, ctx.version = "m", version
    payload = {"detections": dets} if dets is not None else {"top": [{"label": "cat", "index": 0, "score": 0.9}]}
    ctx.inference = Inference(payload, latency_ms=1.0, infer_ms=1.0)
    return ctx


def test_the_stage_annotates_tracks_and_zones_and_publishes_events() -> None:
    events: list[dict] = []
    stage = DetectionStage("cam", source_cfg(
        track=True, labels=["face"], zones=[{"name": "right", "points": [[320, 0], [640, 0], [640, 480], [320, 480]]}],
        events={"min_frames": 2, "lost_frames": 2}), labels_of=lambda m, v: ["face", "cat"], emit=events.append)
    out = []
    for i, x in enumerate(range(100, 500, 40)):
        ctx = stage(ctx_of([det("face", 0.9, (x, 100, x + 80, 180)), det("cat", 0.8)], float(i)))
        out.append(ctx.inference.payload["detections"])
    assert all(len(d) == 1 and d[0]["track_id"] == 1 for d in out)
    assert out[0][0]["zones"] == [] and out[-1][0]["zones"] == ["right"]
    entered = [e for e in events if e["event"] == "object_entered"]
    assert len(entered) == 1
    e = entered[0]
    assert e["source"] == "cam" and e["zone"] == "right" and e["label"] == "face" and e["track_id"] == 1
    assert e["score"] == 0.9 and e["first_seen"] == 0.0 and e["frames"] >= 2 and "id" not in e
    assert stage.counts() == {"right": {"face": {"count": 1, "entered": 1}}}
    stage.flush(99.0)
    assert [e["event"] for e in events][-2:] == ["object_left", "object_gone"]
    assert stage.counts() == {"right": {"face": {"count": 0, "entered": 1}}}


def test_a_label_the_model_lacks_is_an_error_once_per_version(caplog: pytest.LogCaptureFixture) -> None:
    events: list[dict] = []
    labels = {1: ["face"], 2: ["Face"]}
    stage = DetectionStage("cam", source_cfg(labels=["face", "Person"]), labels_of=lambda m, v: labels[v],
                           emit=events.append)
    caplog.set_level(logging.ERROR, "edge_agent.pipeline")
    for ts in range(3):
        stage(ctx_of([det("face", 0.9)], float(ts)))
    stage(ctx_of([det("Face", 0.9)], 3.0, version=2))  # a new version, other labels
    assert [(e["event"], e["version"], e["labels"]) for e in events] == [
        ("label_unknown", 1, ["Person"]), ("label_unknown", 2, ["Person", "face"])]
    assert "label(s) 'Person' in `labels` are not labels of model m v1" in caplog.text
    assert "the model's labels: face" in caplog.text


def test_a_zone_outside_the_frame_is_reported_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    events: list[dict] = []
    stage = DetectionStage("cam", source_cfg(zones=[
        {"name": "far", "points": [[1000, 1000], [1100, 1000], [1100, 1100]]},
        {"name": "edge", "points": [[600, 0], [700, 0], [700, 100]]},
        {"name": "ok", "points": [[0, 0], [20, 0], [20, 20], [0, 20]]}]), emit=events.append)
    caplog.set_level(logging.WARNING, "edge_agent.pipeline")
    for ts in range(3):
        ctx = stage(ctx_of([det("face", 0.9)], float(ts)))
    assert ctx.inference.payload["detections"][0]["zones"] == ["ok"]
    assert [(e["zone"], e["coverage"], e["frame"]) for e in events] == [
        ("far", "outside", [640, 480]), ("edge", "partly", [640, 480])]
    assert "zone 'far' lies entirely outside the 640x480 frame: no detection can ever be in it" in caplog.text
    stage(ctx_of([], 4.0, shape=(2000, 2000, 3)))  # the camera's size changed: checked again
    assert len(events) == 2


def test_a_classifier_passes_untouched() -> None:
    stage = DetectionStage("cam", source_cfg(track=True, labels=["face"]))
    ctx = ctx_of(None, 0.0)
    before = ctx.inference
    assert stage(ctx).inference is before


def test_without_tracking_counts_are_the_latest_frame() -> None:
    stage = DetectionStage("cam", source_cfg(zones=[{"name": "all", "points": [[0, 0], [640, 0], [640, 480], [0, 480]]}]))
    ctx = stage(ctx_of([det("face", 0.9), det("face", 0.8), det("cat", 0.7)], 0.0))
    assert all("track_id" not in d for d in ctx.inference.payload["detections"])
    assert stage.counts() == {"all": {"face": {"count": 2, "entered": 0}, "cat": {"count": 1, "entered": 0}}}
    stage(ctx_of([det("cat", 0.7)], 1.0))
    assert stage.counts() == {"all": {"face": {"count": 0, "entered": 0}, "cat": {"count": 1, "entered": 0}}}


def test_a_reload_keeps_the_tracks() -> None:
    stage = DetectionStage("cam", source_cfg(track=True))
    for ts in range(3):
        ids = [d["track_id"] for d in stage(ctx_of([det("face", 0.9)], float(ts))).inference.payload["detections"]]
    stage.configure(source_cfg(track=True, min_box_area=1.0))
    again = [d["track_id"] for d in stage(ctx_of([det("face", 0.9)], 3.0, version=2)).inference.payload["detections"]]
    assert ids == again == [1]


def test_a_reload_of_a_source_with_zones_keeps_the_stage_running(caplog: pytest.LogCaptureFixture) -> None:
    """A reload builds new zones equal to the old ones: the stage compares its
    cached checks against them (labels per version, zones per frame size)."""
    zones = [{"name": "right", "points": [[320, 0], [640, 0], [640, 480], [320, 480]]}]
    events: list[dict] = []
    stage = DetectionStage("cam", source_cfg(zones=zones, labels=["face"]), labels_of=lambda m, v: ["face"],
                           emit=events.append)
    stage(ctx_of([det("face", 0.9, (400, 100, 480, 180))], 0.0))
    stage.configure(source_cfg(zones=zones, labels=["face"]))
    ctx = stage(ctx_of([det("face", 0.9, (400, 100, 480, 180))], 1.0))
    assert ctx.inference.payload["detections"][0]["zones"] == ["right"]
    assert stage.check_model("m", 1) == [] and events == []


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("detect, problem", [
    ({"zones": [{"name": "a", "points": [[0, 0], [1, 1]]}]}, "zones[0] (a).points: a zone needs at least 3 points, got 2"),
    ({"zones": [{"name": "a", "points": [[0, 0], [1, 1], [2, 2]]}]}, "the points enclose no area"),
    ({"zones": [{"name": "a", "points": [[0, 0], [1, 0], [1, 1]]}, {"name": "a", "points": [[0, 0], [1, 0], [1, 1]]}]},
     "zones[1] (a).name: used twice"),
    ({"thresholds": {"face": 1.5}}, "thresholds.face: Input should be less than or equal to 1"),
    ({"thresholds": {"face": -0.1}}, "thresholds.face: Input should be greater than or equal to 0"),
    ({"labels": ["face"], "thresholds": {"car": 0.5}}, "thresholds: 'car' not in `labels`"),
    ({"labels": []}, "labels: List should have at least 1 item"),
    ({"min_box_area": -1}, "min_box_area: Input should be greater than or equal to 0"),
    ({"events": {"min_frames": 0}}, "events.min_frames: Input should be greater than or equal to 1"),
    ({"zones": [{"name": "a", "points": [[0, 0], [1, 0], [1, 1]], "colour": "red"}]}, "zones[0] (a).colour: unknown key"),
])
def test_bad_detection_config_names_the_key(detect, problem) -> None:
    with pytest.raises(ConfigError) as err:
        source_cfg(**detect)
    assert any(problem in p for p in err.value.problems), err.value.problems
    assert err.value.exit_code == 2


def test_every_detection_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        source_cfg(thresholds={"face": 2.0},
                   zones=[{"name": "a", "points": [[0, 0]]}, {"name": "a", "points": [[0, 0], [1, 0], [1, 1]]}])
    text = "\n".join(err.value.problems)
    assert "thresholds.face" in text and "at least 3 points" in text and "(a).name: used twice" in text


def test_telemetry_carries_zone_counts_only_for_sources_with_zones(tmp_path) -> None:
    from edge_agent.telemetry import SourceInterval, TelemetryCollector

    counts = {"door": {"face": {"count": 1, "entered": 3}}}
    collector = TelemetryCollector(disk_path=tmp_path, sources=lambda: {
        "cam": SourceInterval(frames=2, zones=counts), "plain": SourceInterval(frames=2)})
    sources = collector.collect()["sources"]
    assert sources["cam"]["zones"] == counts
    assert "zones" not in sources["plain"]

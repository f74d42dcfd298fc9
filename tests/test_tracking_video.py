"""Tracking and zones on a real video through the real agent: the real
BlazeFace (LiteRT) on ``crossing_video`` (two crops of the astronaut's head
over a real photo: one standing, one walking across the zone and back),
frames read from the file, inferred, filtered, tracked and turned into
events by the agent's own pipeline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import testassets

from edge_agent.agent import Agent
from edge_agent.config import parse_config
from edge_agent.testing import RecordingSink
from waiting import wait_until


@pytest.fixture(scope="module")
def crossing(assets) -> tuple[Path, dict]:
    video = testassets.build(testassets.default_cache_dir(), only={"crossing_video"})["crossing_video"]
    return video, json.loads(video.with_suffix(".json").read_text())


def config_of(tmp_path: Path, bundle: Path, video: Path, realtime: bool = False, mqtt: dict | None = None,
              **detect) -> dict:
    return {
        "device_id": "tracking", "log_level": "warning",
        "store": {"path": str(tmp_path / "store")},
        "models": [{"name": "blazeface", "bundle": str(bundle), "threads": 1}],
        "sources": [{"name": "walk", "uri": str(video), "model": "blazeface", "realtime": realtime, **detect}],
        **({"mqtt": mqtt} if mqtt else {}),
    }


def run_agent(tmp_path: Path, bundle: Path, video: Path, realtime: bool = False, mqtt: dict | None = None,
              **detect) -> tuple[Agent, RecordingSink, list[dict]]:
    config = parse_config(config_of(tmp_path, bundle, video, realtime, mqtt, **detect))
    sink, events = RecordingSink(), []
    agent = Agent(config, extra_sinks=[sink])
    agent.events.append(events.append)
    agent.start()
    return agent, sink, events


def test_one_entered_per_crossing_stable_ids_nothing_for_the_standing_face(
    crossing, blazeface_bundle: Path, tmp_path: Path
) -> None:
    video, truth = crossing
    agent, sink, events = run_agent(tmp_path, blazeface_bundle, video, track=True, labels=["face"],
                                    zones=[{"name": "door", "points": truth["zone"]}],
                                    events={"min_frames": 3, "lost_frames": 5})
    try:
        wait_until(lambda: agent.workers[0].done, 120, "the video processed to its end")
        intervals = agent._source_intervals()
    finally:
        agent.shutdown()
    results = [r for s, r, _ in sink.items if s == "walk"]
    assert len(results) == truth["frames"]
    # The walker is on the top half, the standing face on the bottom half: each keeps one id throughout.
    walker_ids = {d["track_id"] for r in results for d in r["detections"] if d["box"][3] < 240}
    standing_ids = {d["track_id"] for r in results for d in r["detections"] if d["box"][1] > 240}
    assert len(walker_ids) == 1 and len(standing_ids) == 1 and walker_ids != standing_ids, (walker_ids, standing_ids)
    (walker,), (standing,) = walker_ids, standing_ids
    assert all(d["zones"] == [] for r in results for d in r["detections"] if d["track_id"] == standing)
    in_zone = [r["frame"] for r in results for d in r["detections"] if d["track_id"] == walker and d["zones"] == ["door"]]
    assert in_zone, "the walker is never in the zone"

    detection_events = [e for e in events if e["event"].startswith("object_")]
    entered = [e for e in detection_events if e["event"] == "object_entered"]
    left = [e for e in detection_events if e["event"] == "object_left"]
    assert len(entered) == truth["crossings"] == 2, entered
    assert len(left) == 2, left  # out on the far side, then back out where it came from
    assert {e["track_id"] for e in entered + left} == {walker}
    assert all(e["zone"] == "door" and e["label"] == "face" and e["source"] == "walk" for e in entered + left)
    # each entry comes min_frames after the walker's centre crossed the zone's edge (a few frames' slack for the box)
    entered_frames = [next(r["frame"] for r in results if r["ts"] == e["ts"]) for e in entered]
    for got, expected in zip(entered_frames, truth["entries"]):
        assert expected <= got <= expected + 3 + 6, (entered_frames, truth["entries"])
    # the standing face: appeared once, gone at the end of the video, nothing else
    standing_events = [e["event"] for e in detection_events if e["track_id"] == standing]
    assert standing_events == ["object_appeared", "object_gone"], standing_events
    appeared = [e for e in detection_events if e["event"] == "object_appeared"]
    assert sorted(e["track_id"] for e in appeared) == sorted([walker, standing])
    gone = next(e for e in detection_events if e["event"] == "object_gone" and e["track_id"] == walker)
    assert gone["frames"] == truth["frames"] and 0.5 < gone["score"] <= 1.0
    assert gone["first_seen"] <= entered[0]["first_seen"] <= gone["last_seen"]
    assert all("id" not in e or e["id"] is None for e in detection_events)
    assert intervals["walk"].zones == {"door": {"face": {"count": 0, "entered": 2}}}


def test_a_label_the_model_lacks_is_named_at_start(
    crossing, blazeface_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BlazeFace's one label is "face": an allow-list asking for "person" is an error at start that
    names it and the model's labels; the agent keeps running (and reports the faces it may)."""
    video, _ = crossing
    caplog.set_level(logging.ERROR, "edge_agent.pipeline")
    agent, sink, events = run_agent(tmp_path, blazeface_bundle, video, labels=["face", "person"],
                                    zones=[{"name": "away", "points": [[2000, 0], [2100, 0], [2100, 100]]}])
    try:
        unknown = [e for e in events if e["event"] == "label_unknown"]
        assert [(e["labels"], e["model_labels"]) for e in unknown] == [(["person"], ["face"])]
        assert "label(s) 'person' in `labels` are not labels of model blazeface v1" in caplog.text
        wait_until(lambda: any(e["event"] == "zone_outside_frame" for e in events), 30, "the zone checked")
        wait_until(lambda: len(sink.items) >= 3, 30, "results")
        # a reload that asks for another missing label says so again, naming it
        changes = agent.reload(parse_config(config_of(tmp_path, blazeface_bundle, video, labels=["face", "car"])))
        assert changes == ["source walk: labels ['face', 'car'], zones []"], changes
        unknown = [e for e in events if e["event"] == "label_unknown"]
        assert [e["labels"] for e in unknown] == [["person"], ["car"]]
    finally:
        agent.shutdown()
    outside = next(e for e in events if e["event"] == "zone_outside_frame")
    assert outside["zone"] == "away" and outside["frame"] == [640, 480] and outside["coverage"] == "outside"
    assert all(d["label"] == "face" for _, r, _ in sink.items for d in r["detections"])


def test_a_new_model_version_keeps_the_tracks(
    crossing, blazeface_bundle: Path, tmp_path: Path, assets: dict[str, Path]
) -> None:
    """Version 2 activated while the walker is on its way: the tracker belongs to the source, so
    the walker keeps its id across the swap, appears once, and enters the zone once per crossing."""
    from edge_agent.bundles.pack import pack
    from edge_agent.models.lifecycle import deploy

    video, truth = crossing
    labels = tmp_path / "face.txt"
    labels.write_text("face\n")
    v2 = pack(assets["blazeface"], name="blazeface", version=2, out=tmp_path / "v2", labels=labels, task="detect",
              preprocessing={"resize": "letterbox", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    agent, sink, events = run_agent(tmp_path, blazeface_bundle, video, realtime=True, track=True,
                                    zones=[{"name": "door", "points": truth["zone"]}])
    try:
        # the file plays at its own 30 fps (realtime): the swap lands while the walker walks
        wait_until(lambda: len(sink.items) >= 12, 30, "the first frames served by v1")
        deploy(agent.models, v2)
        wait_until(lambda: agent.workers[0].done, 60, "the video played to its end")
    finally:
        agent.shutdown()
    results = [r for s, r, _ in sink.items if s == "walk"]
    by_version = {v: [r for r in results if r["version"] == v] for v in (1, 2)}
    assert by_version[1] and by_version[2], {v: len(rs) for v, rs in by_version.items()}
    walker = {v: {d["track_id"] for r in rs for d in r["detections"] if d["box"][3] < 240} for v, rs in by_version.items()}
    assert walker[1] == walker[2] and len(walker[1]) == 1, walker
    object_events = [(e["event"], e["track_id"]) for e in events if e["event"].startswith("object_")]
    (walker_id,) = walker[1]
    assert [ev for ev, t in object_events if t == walker_id].count("object_appeared") == 1, object_events
    entered = [ev for ev, t in object_events if ev == "object_entered"]
    assert len(entered) == 2, object_events


def test_detection_events_and_zone_counts_over_mqtt(
    crossing, blazeface_bundle: Path, tmp_path: Path, broker
) -> None:
    """The same crossings through a real broker: object_* on P/D/events with a null id, the zone's
    counts in the telemetry."""
    from mqtt_helpers import Client

    video, truth = crossing
    sub = Client(broker.host, broker.port, ["trk/tracking/events", "trk/tracking/telemetry"])
    try:
        agent, _, _ = run_agent(tmp_path, blazeface_bundle, video, track=True,
                                zones=[{"name": "door", "points": truth["zone"]}],
                                mqtt={"host": broker.host, "port": broker.port, "topic_prefix": "trk",
                                      "telemetry_interval_s": 0.2})
        try:
            sub.wait_for(lambda: [e for e in sub.json("/events") if e["event"] == "object_gone"][1:], 60)
            sub.wait_for(lambda: any(t["sources"].get("walk", {}).get("zones", {}).get("door", {}).get("face", {})
                                     .get("entered") == 2 for t in sub.json("/telemetry")), 10)
        finally:
            agent.shutdown()
        events = [e for e in sub.json("/events") if e["event"].startswith("object_")]
        entered = [e for e in events if e["event"] == "object_entered"]
        assert len(entered) == 2 and all(e["id"] is None and e["zone"] == "door" for e in entered), entered
        for e in entered:
            assert set(e) == {"ts", "id", "event", "source", "zone", "label", "track_id", "score", "first_seen",
                              "last_seen", "frames"}
    finally:
        sub.close()

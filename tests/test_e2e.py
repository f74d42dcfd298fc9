"""End to end: ``edge-agent run`` as a separate process, the real MobileNetV2,
the real demo video, a real mosquitto, and a separate MQTT client reading
what the agent publishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import CAT_CLASSES, Broker
from waiting import poll_until

pytestmark = pytest.mark.integration


class Subscriber:
    """A plain paho client collecting every message under ``topic``."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, dict, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{os.getpid()}-{time.time()}")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def on(self, suffix: str) -> list[dict]:
        with self.lock:
            return [payload for topic, payload, _ in self.messages if topic.endswith(suffix)]

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        return bool(poll_until(predicate, timeout, interval=0.05))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def write_config(tmp_path: Path, broker: Broker, bundle: Path, video: Path, *, device: str, loop: bool) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
device_id = "{device}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
topic_prefix = "e2e"

[store]
path = "store"

[[models]]
name = "mobilenet_v2"
bundle = "{bundle}"
threads = 1

[[sources]]
name = "cam"
uri = "{video}"
model = "mobilenet_v2"
fps = 10
loop = {str(loop).lower()}
log_results = true
"""
    )
    return config


def agent_process(config: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_agent_classifies_demo_video_over_mqtt(tmp_path, broker, mobilenet_bundle, assets):
    """The product's core promise: a real model on real frames, results on
    MQTT for any subscriber, availability visible on the retained status."""
    sub = Subscriber(broker, "e2e/dev-a/#")
    proc = agent_process(write_config(tmp_path, broker, mobilenet_bundle, assets["demo_video"], device="dev-a", loop=False))
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert sub.wait_for(lambda: any(s["state"] == "stopped" for s in sub.on("/status")), 10), out
    sub.close()

    results = sub.on("/results/cam")
    # 10 s of video at an fps cap of 10: about 100 results, never all 300 frames.
    assert 50 <= len(results) <= 110, len(results)
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    frames = [r["frame"] for r in results]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)
    first = results[0]
    assert set(first) >= {"ts", "seq", "frame", "model", "version", "latency_ms", "top"}
    assert first["model"] == "mobilenet_v2" and first["version"] == 1
    # The video opens on the chelsea photo (frames 0-29): a cat class must win.
    cat_frames = [r for r in results if r["frame"] < 30]
    assert cat_frames, "no result for the cat segment"
    assert all(r["top"][0]["label"] in CAT_CLASSES for r in cat_frames), [r["top"][0] for r in cat_frames]
    # and the coffee photo (frames 30-59) is an espresso.
    coffee = [r for r in results if 33 <= r["frame"] < 59]
    assert coffee and all(r["top"][0]["label"] == "espresso" for r in coffee)

    states = [s["state"] for s in sub.on("/status")]
    assert states[0] == "online" and states[-1] == "stopped"
    online = sub.on("/status")[0]
    assert online["models"]["mobilenet_v2"]["active"] == 1
    assert online["models"]["mobilenet_v2"]["runtime"] == "onnx"
    # One readable log line per result as well.
    assert out.count("Egyptian cat") + out.count("tabby") + out.count("tiger cat") > 0


def test_sigterm_finishes_cleanly_and_publishes_stopped(tmp_path, broker, mobilenet_bundle, assets):
    """systemd stops the agent with SIGTERM: it must exit 0 and leave a
    retained ``stopped`` status, not the last will's ``offline``."""
    proc = agent_process(write_config(tmp_path, broker, mobilenet_bundle, assets["demo_video"], device="dev-b", loop=True))
    sub = Subscriber(broker, "e2e/dev-b/#")
    try:
        assert sub.wait_for(lambda: len(sub.on("/results/cam")) >= 5, 60), "no results"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert sub.wait_for(lambda: sub.on("/status") and sub.on("/status")[-1]["state"] == "stopped", 10)
    sub.close()
    # A new subscriber sees the retained state.
    late = Subscriber(broker, "e2e/dev-b/status")
    assert late.wait_for(lambda: late.on("/status"), 10)
    assert late.on("/status")[-1]["state"] == "stopped"
    late.close()


def test_broker_down_at_start_does_not_block(tmp_path, mobilenet_bundle, assets):
    """A broker that is down at boot must not stop the cameras: results are
    still logged and the agent finishes its work."""
    from mqtt_helpers import free_port

    config = write_config(
        tmp_path, Broker("127.0.0.1", free_port()), mobilenet_bundle, assets["demo_video"], device="dev-c", loop=False
    )
    proc = agent_process(config)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Egyptian cat" in out


def test_bad_bundle_refused_with_clear_error(tmp_path, broker, mobilenet_bundle, assets):
    """A tampered bundle never serves: the agent names the file and exits 1
    without a traceback."""
    import shutil

    bad = tmp_path / "bad_bundle"
    shutil.copytree(mobilenet_bundle, bad)
    labels = bad / "labels.txt"
    text = labels.read_text()
    labels.write_text(text.replace("tabby", "tubby"))
    proc = agent_process(write_config(tmp_path, broker, bad, assets["demo_video"], device="dev-d", loop=False))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "labels.txt" in out and "Traceback" not in out
